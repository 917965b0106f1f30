"""Attention implementations on one packed Transfusion layout: time and agreement.

    python benchmarks/attention.py --batch 4 --seq-len 4096 --heads 16 --head-dim 128

For each `model.attention_impl` (tfx_jax.models.attention) that runs on this machine: forward and
forward+backward time of one attention call on a synthetic packed batch (documents with text and
image blocks, bf16), and the largest deviation of its output and gradients from the `xla`
reference (fp32 softmax). `cudnn_causal` is cuDNN's plain causal kernel on the same q/k/v (the
wrong mask for Transfusion: the yardstick for speed only). `pallas_gpu[X]` rows are tile-size
variants of the `pallas_gpu` kernel (`--pallas-variants`). Prints one table. No grain/TFDS needed.

Layouts (`--layout`): `short` (the synthetic source's rows: documents of a few hundred tokens,
~95% image patches), `paper` (Transfusion §4.1's mix, `synthetic.paper_mix_batch`: half text
from long-tailed documents, 256-patch images), `one-doc` (every row one causal document: the
case where a masked kernel should match cuDNN's causal one).

"useful TFLOP/s" counts only the (query, key) pairs the mask lets attend (all causal pairs for
`cudnn_causal`), at 4·H FLOPs per pair and head forward and 2.5 times that backward (the
FlashAttention-2 convention: the backward's five matmuls, one a recompute of QKᵀ), over the
fwd+bwd time; "÷ cuDNN" divides it by `cudnn_causal`'s — the kernel's efficiency on the work
that matters, whatever the mask's density.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax.data.sources import synthetic
from tfx_jax.models import attention, gpu_attention
from tfx_jax.models.mask import key_ranges

# Tile-size variants of the pallas_gpu kernel to time beside its default (BlockSizes(): 128x64
# forward, dQ 64x32, dK/dV 32x64, 8/4 warps, 2/3 stages; "thin" when first measured).
# Fields: fwd_q, fwd_k, dq_q, dq_k, dkv_q, dkv_k, fwd_warps, fwd_stages, bwd_warps, bwd_stages.
VARIANTS = {
    "tutorial": gpu_attention.BlockSizes(128, 64, 128, 32, 32, 128, 8, 3, 8, 3),
    "big": gpu_attention.BlockSizes(128, 128, 128, 64, 64, 128, 8, 3, 8, 2),
    "64": gpu_attention.BlockSizes(64, 64, 64, 64, 64, 64, 4, 3, 4, 3),
}


def _one_document_per_row(rng: np.random.Generator, B: int, T: int) -> dict[str, np.ndarray]:
    return {"segment_ids": np.ones((B, T), np.int32), "image_ids": np.zeros((B, T), np.int32)}


LAYOUTS = {
    # Images of 16x16 patches (a 32x32x4 latent, patch 2), as many per row as fit.
    "short": lambda rng, B, T: synthetic.packed_batch(rng, B, T, 100, 32, 4, 2, T // (256 + 2)),
    "paper": lambda rng, B, T: synthetic.paper_mix_batch(rng, B, T, 100, 32, 8, 2),
    "one-doc": _one_document_per_row,
}


def _time(fn, *args, repeats: int = 50) -> float:
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
    p.add_argument("--impls", default="xla,cudnn_causal,cudnn,tokamax,pallas_gpu")
    p.add_argument("--pallas-variants", default=",".join(VARIANTS), help="'' for none")
    p.add_argument("--layout", choices=LAYOUTS, default="short")
    args = p.parse_args()
    B, T, N, K, H = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
    layout = LAYOUTS[args.layout](np.random.default_rng(0), B, T)
    seg, img = jnp.asarray(layout["segment_ids"]), jnp.asarray(layout["image_ids"])
    ks, ke = key_ranges(seg, img)
    visible = float(jnp.where(seg > 0, ke - ks, 0).sum())
    causal = B * T * (T + 1) / 2

    def useful_tflops(name: str, ms: float) -> float:
        pairs = causal if name == "cudnn_causal" else visible
        return pairs * N * H * 4 * 3.5 / (ms * 1e-3) / 1e12

    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, K, H), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, K, H), jnp.bfloat16)
    ct = jax.random.normal(keys[3], (B, T, N, H), jnp.bfloat16)

    def with_grads(fwd):
        def fwd_bwd(q, k, v):
            out, vjp = jax.vjp(fwd, q, k, v)
            return out, vjp(ct)

        return jax.jit(fwd), jax.jit(fwd_bwd)

    def programs(name):
        if name == "cudnn_causal":
            return with_grads(
                functools.partial(
                    jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"
                )
            )
        if name.startswith("pallas_gpu["):
            blocks = VARIANTS[name[len("pallas_gpu[") : -1]]
            fn = functools.partial(gpu_attention.attention, blocks=blocks)
            return with_grads(lambda q, k, v: fn(q, k, v, key_ranges(seg, img)))
        impl = attention.get(name)
        return with_grads(lambda q, k, v: impl.apply(q, k, v, impl.prepare(seg, img)))

    _, ref_fb = programs("xla")
    ref_out, ref_grads = ref_fb(q, k, v)
    names = args.impls.split(",")
    names += [f"pallas_gpu[{v}]" for v in args.pallas_variants.split(",") if v]
    rows, causal_ms, causal_rate = [], None, None
    for name in names:
        try:
            fwd, fb = programs(name)
            out, grads = fb(q, k, v)
            t_fwd, t_fb = _time(fwd, q, k, v), _time(fb, q, k, v)
        except Exception as e:  # e.g. cudnn off GPU, tokamax not installed
            msg = " ".join(str(e).split())[:160]
            rows.append(
                f"| {name} | n/a | n/a | n/a | n/a | n/a | n/a | {type(e).__name__}: {msg} |"
            )
            print(rows[-1], flush=True)
            continue
        rate = useful_tflops(name, t_fb)
        if name == "cudnn_causal":
            causal_ms, causal_rate = t_fb, rate
        if name == "cudnn_causal":
            err = "(other mask)"
        else:
            abs_o = jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32))
            rel = max(
                float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
                / float(jnp.abs(b.astype(jnp.float32)).max())
                for a, b in zip((out, *grads), (ref_out, *ref_grads), strict=True)
            )
            err_g = max(
                float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
                for a, b in zip(grads, ref_grads, strict=True)
            )
            err = f"{float(abs_o.max()):.3g} / {err_g:.3g} (rel {rel:.2g})"
        ratio = f"{t_fb / causal_ms:.2f}" if causal_ms else "n/a"
        of_cudnn = f"{rate / causal_rate:.2f}" if causal_rate else "n/a"
        rows.append(
            f"| {name} | {t_fwd:.3f} | {t_fb:.3f} | {ratio} | {rate:.0f} | {of_cudnn} | {err} | |"
        )
        print(rows[-1], flush=True)
    print(
        f"\nlayout {args.layout}: B={B} T={T} heads={N} kv_heads={K} head_dim={H} bf16, "
        f"{jax.devices()[0].device_kind}"
    )
    print(
        f"visible (query, key) pairs: {visible / causal:.3f} of a causal mask's; pallas_gpu tiles"
    )
    print(f"{gpu_attention.BlockSizes()}")
    cols = ["impl", "fwd ms", "fwd+bwd ms", "fwd+bwd / cudnn_causal", "useful TFLOP/s", "÷ cuDNN"]
    cols += ["max abs err vs xla (out / grads)", "note"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    print("\n".join(rows))
    print(f"jax {jax.__version__}, {datetime.date.today()}")


if __name__ == "__main__":
    main()
