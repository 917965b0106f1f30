"""Attention implementations on one packed Transfusion layout: time and agreement.

    python benchmarks/attention.py --batch 4 --seq-len 4096 --heads 16 --head-dim 128

For each `model.attention_impl` (tfx_jax.models.attention) that runs on this machine: forward and
forward+backward time of one attention call on a synthetic packed batch (documents with text and
image blocks, bf16), and the largest deviation of its output and gradients from the `xla`
reference (fp32 softmax). Prints one table. No grain/TFDS needed.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax.data.sources import synthetic
from tfx_jax.models import attention


def _time(fn, *args, repeats: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--impls", default="xla,cudnn,tokamax")
    args = p.parse_args()
    B, T, N, K, H = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
    # Images of 16x16 patches (a 32x32x4 latent, patch 2), as many per row as fit.
    layout = synthetic.packed_batch(np.random.default_rng(0), B, T, 100, 32, 4, 2, T // (256 + 2))
    seg, img = jnp.asarray(layout["segment_ids"]), jnp.asarray(layout["image_ids"])
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, K, H), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, K, H), jnp.bfloat16)
    ct = jax.random.normal(keys[3], (B, T, N, H), jnp.bfloat16)

    def programs(name):
        impl = attention.get(name)

        def fwd(q, k, v):
            return impl.apply(q, k, v, impl.prepare(seg, img))

        def fwd_bwd(q, k, v):
            out, vjp = jax.vjp(fwd, q, k, v)
            return out, vjp(ct)

        return jax.jit(fwd), jax.jit(fwd_bwd)

    _, ref_fb = programs("xla")
    ref_out, ref_grads = ref_fb(q, k, v)
    rows = []
    for name in args.impls.split(","):
        try:
            fwd, fb = programs(name)
            out, grads = fb(q, k, v)
        except Exception as e:  # e.g. cudnn off GPU, tokamax not installed
            rows.append(f"| {name} | n/a | n/a | n/a | {type(e).__name__}: {str(e)[:60]} |")
            continue
        err_o = float(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32)).max())
        err_g = max(
            float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
            for a, b in zip(grads, ref_grads, strict=True)
        )
        rows.append(
            f"| {name} | {_time(fwd, q, k, v):.2f} | {_time(fb, q, k, v):.2f} | "
            f"{err_o:.3g} / {err_g:.3g} | |"
        )
    print(f"B={B} T={T} heads={N} kv_heads={K} head_dim={H} bf16, {jax.devices()[0].device_kind}")
    print("| impl | fwd ms | fwd+bwd ms | max abs err vs xla (out / grads) | note |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"jax {jax.__version__}")


if __name__ == "__main__":
    main()
