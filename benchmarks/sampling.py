"""Sampling speed: full vs rolling diffusion, with and without the prefix KV cache.

    .venv/bin/python benchmarks/sampling.py --short 16 --long 1024 --steps 16   # CPU
    PYTHONPATH=. python benchmarks/sampling.py --d-model 512 --layers 8 --heads 8 --batch 8 \\
        --long 2048 --steps 50 --dtype bfloat16 --attention cudnn    # e.g. one H100

Prints one table row per (mode, cache, prefix): reverse steps per image, milliseconds per step
(one transformer evaluation of the whole batch) and images per second, for B images of 256 patches
(a 32x32x4 latent, patch 2) after a text prefix of P tokens, on a small randomly initialised
Transfusion (speed does not depend on the weights).

  full    / cache     the prefix is cached once; each step runs the 256-patch block only
  full    / no cache  each step runs the training forward pass over prefix + block
  rolling / cache     each step runs the W-row window only; finished rows are cached one by one
  rolling / no cache  each step runs prefix + the whole block (finished rows clean, the window,
                      the rows after it as pure noise) with the rolling attention ids

Rolling sampling runs one init pass of W·n steps and then one pass of n = steps // W steps per
further row, so every row spends about as many steps in the window as full sampling takes; its
steps are cheaper (W of 16 rows) but more numerous. No grain or tensorflow_datasets import: it
runs on a bare accelerator machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import time

import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax import layout, sharding
from tfx_jax.config import Config, DiffusionConfig, MeshConfig, ModelConfig
from tfx_jax.diffusion import rolling, samplers
from tfx_jax.generate.decode import Decoder, mesh_context
from tfx_jax.generate.options import SampleOptions
from tfx_jax.layout import ModelInputs
from tfx_jax.models.transformer import Transfusion


def build(args) -> tuple[Config, Decoder, dict, jax.sharding.Mesh]:
    model = ModelConfig(
        vocab_size=1024,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        latent_size=32,
        latent_channels=4,
        patch_size=2,  # 16 x 16 = 256 patches
        dtype=args.dtype,
        remat_policy="none",
        attention_impl=args.attention,
    )
    cfg = Config(
        name="bench",
        model=model,
        diffusion=DiffusionConfig(mode="rolling", rolling_window=args.window),
        mesh=MeshConfig(data=1),
    )
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    opts = SampleOptions(sampler="ddim", diffusion_steps=args.steps, image_mode="full")
    dec = Decoder(cfg, mesh, opts)
    inputs = ModelInputs.dummy(cfg, length=8, images=1)
    params = jax.jit(lambda k: Transfusion(cfg.model).init(k, inputs)["params"])(jax.random.key(0))
    return cfg, dec, dec.put_params(params), mesh


def layout_of(B: int, P: int, I: int) -> dict[str, np.ndarray]:
    """B rows of [BOS, P-2 words, BOI, I patches] (the sequence the uncached paths run)."""
    tokens = np.zeros((B, P + I), np.int32)
    tokens[:, 0], tokens[:, 1 : P - 1], tokens[:, P - 1] = 1, 7 + np.arange(P - 2) % 900, 4
    img = np.zeros((B, P + I), np.int32)
    img[:, P:] = 1
    return {
        "tokens": tokens,
        "segment_ids": np.ones((B, P + I), np.int32),
        "positions": np.broadcast_to(np.arange(P + I), (B, P + I)).astype(np.int32),
        "image_ids": img,
    }


def chunk_of(seq: dict, a: int, n: int, attn: np.ndarray | None = None) -> dict[str, jax.Array]:
    out = {k: v[:, a : a + n] for k, v in seq.items()}
    pad = a + n - seq["tokens"].shape[1]
    if pad > 0:  # a window overhanging the last row: padding
        out = {k: np.pad(v, ((0, 0), (0, pad))) for k, v in out.items()}
    out["attn_image_ids"] = out["image_ids"] if attn is None else attn
    return {k: jnp.asarray(v) for k, v in out.items()}


def prefill(dec, params, cache, seq, P: int, B: int, key):
    """Writes the P-token prefix into the cache (computed once per image)."""
    allowed = jnp.ones((B, dec.cfg.model.vocab_size), bool)
    no_images = jnp.zeros((B, 0, 32, 32, 4))
    index, last = jnp.zeros(B, jnp.int32), jnp.full(B, P - 1)
    return dec.prefill(params, cache, index, chunk_of(seq, 0, P), no_images, last, key, allowed)[1]


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / repeats


def bench_full(dec, params, seq, P, B, cached: bool, repeats: int) -> tuple[int, float]:
    m = dec.cfg.model
    I = m.num_patches
    x_T = jax.random.normal(jax.random.key(1), (B, 1, 32, 32, 4))
    key = jax.random.key(2)
    if cached:
        cache = dec.new_cache(B, P + I)
        cache = prefill(dec, params, cache, seq, P, B, key)
        block = chunk_of(seq, P, I)
        index = jnp.full((B,), P, jnp.int32)
        return len(dec.timesteps), timed(
            lambda: dec.image_full(params, cache, index, block, x_T, key), repeats
        )
    model = Transfusion(m)
    s = {k: jnp.asarray(v) for k, v in seq.items()}
    slot, start, _ = layout.image_slots(s["segment_ids"], s["image_ids"], 1)

    @jax.jit
    def run(x_T):
        def denoise(x, t):
            t_BMI = jnp.full((B, 1, I), t, jnp.int32)
            args = (s["tokens"], s["segment_ids"], s["positions"], s["image_ids"], slot, start)
            out = model.apply({"params": params}, ModelInputs(*args, x, t_BMI), with_logits=False)
            return out.eps

        return samplers.sample(denoise, x_T, dec.schedule, dec.timesteps, "ddim", key)

    with mesh_context(dec.mesh, dec.cfg):
        return len(dec.timesteps), timed(lambda: run(x_T), repeats)


def bench_rolling(dec, params, seq, P, B, cached: bool, repeats: int, W: int) -> tuple[int, float]:
    m = dec.cfg.model
    g, p, I = dec.rows, m.patch_size, m.num_patches
    plan = rolling.sampling_plan(g, W, max(len(dec.timesteps) // W, 1))
    n_steps = sum(len(ps.taus) - 1 for ps in plan)
    key = jax.random.key(3)
    window_id = rolling.block_id(1, g, g)
    if cached:
        cache0 = dec.new_cache(B, P + I + W * g)
        cache0 = prefill(dec, params, cache0, seq, P, B, key)
        wins = [chunk_of(seq, P + ps.start_row * g, W * g) for ps in plan]
        for c, ps in zip(wins, plan, strict=True):
            exists = jnp.arange(W * g) + ps.start_row * g < I
            c["segment_ids"] = c["segment_ids"] * exists
            c["image_ids"] = c["image_ids"] * exists
            c["attn_image_ids"] = jnp.where(exists, window_id, 0) * jnp.ones_like(c["image_ids"])
        rows = [chunk_of(seq, P + ps.start_row * g, g) for ps in plan]
        for r, c in enumerate(rows):
            c["attn_image_ids"] = jnp.full_like(c["image_ids"], rolling.block_id(1, r, g))
        taus = [jnp.asarray(ps.taus, jnp.float32) for ps in plan]

        def run():
            cache = cache0
            x = jax.random.normal(key, (B, 1, W * p, 32, 4))
            for i, ps in enumerate(plan):
                at = jnp.full((B,), P + ps.start_row * g, jnp.int32)
                x = dec.rolling_pass(params, cache, at, wins[i], x, taus[i], key)
                cache = dec.commit(params, cache, at, rows[i], x[:, :, :p])
                fresh = jax.random.normal(jax.random.fold_in(key, i), x[:, :, :p].shape)
                x = jnp.concatenate([x[:, :, p:], fresh], axis=2)
            return cache.k

        return n_steps, timed(run, repeats)

    # No cache: every step runs prefix + the whole block, with the rolling attention ids.
    model = Transfusion(m)
    s = {k: jnp.asarray(v) for k, v in seq.items()}
    slot, start, _ = layout.image_slots(s["segment_ids"], s["image_ids"], 1)
    T = dec.schedule.num_timesteps
    abar = jnp.asarray(rolling.alpha_bars(dec.schedule), jnp.float32)
    row_of_token = jnp.asarray(np.where(seq["image_ids"] > 0, np.arange(P + I) - P, 0) // g)

    @jax.jit
    def run_pass(x_full, taus_full, r0):
        attn = rolling.attention_image_ids(s["image_ids"], row_of_token, r0, W, g)
        lev = rolling.levels(taus_full, T)  # [n + 1, g]

        def body(x, j):
            t_BMI = jnp.broadcast_to(jnp.repeat(rolling.model_timesteps(lev[j]), g), (B, 1, I))
            args = (s["tokens"], s["segment_ids"], s["positions"], attn, slot, start)
            inputs = ModelInputs(*args, x, t_BMI)
            eps = model.apply({"params": params}, inputs, with_logits=False).eps
            a_t = jnp.repeat(abar[lev[j]], p)[None, None, :, None, None]
            a_s = jnp.repeat(abar[lev[j + 1]], p)[None, None, :, None, None]
            return samplers.ddim_step(x, eps, a_t, a_s), None

        return jax.lax.scan(body, x_full, jnp.arange(lev.shape[0] - 1))[0]

    full_taus = []
    for ps in plan:
        tau = np.where(np.arange(g) < ps.start_row, 0.0, 1.0)[None].repeat(len(ps.taus), 0)
        k = min(W, g - ps.start_row)
        tau[:, ps.start_row : ps.start_row + k] = ps.taus[:, :k]
        full_taus.append(jnp.asarray(tau, jnp.float32))

    def run():
        x = jax.random.normal(key, (B, 1, 32, 32, 4))
        for ps, tau in zip(plan, full_taus, strict=True):
            x = run_pass(x, tau, ps.start_row)
        return x

    with mesh_context(dec.mesh, dec.cfg):
        return n_steps, timed(run, repeats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--short", type=int, default=16, help="short prefix (tokens)")
    ap.add_argument("--long", type=int, default=512, help="long prefix (tokens)")
    ap.add_argument("--steps", type=int, default=8, help="reverse steps of full sampling")
    ap.add_argument("--window", type=int, default=4, help="rolling window (patch rows)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention", default="xla")
    args = ap.parse_args(argv)

    cfg, dec, params, _ = build(args)
    dev = jax.devices()[0]
    print(
        f"# {datetime.date.today()} jax {jax.__version__} on {dev.platform} ({dev.device_kind}); "
        f"d_model {args.d_model}, {args.layers} layers, batch {args.batch}, 256 patches/image, "
        f"{args.steps} DDIM steps, rolling window {args.window} rows, {args.dtype}"
    )
    print("| mode | prefix cache | prefix tokens | steps/image | ms/step | images/s |")
    print("|---|---|---:|---:|---:|---:|")
    rows = []
    for P in (args.short, args.long):
        seq = layout_of(args.batch, P, cfg.model.num_patches)
        for mode in ("full", "rolling"):
            for cached in (True, False):
                if mode == "full":
                    n, sec = bench_full(dec, params, seq, P, args.batch, cached, args.repeats)
                else:
                    n, sec = bench_rolling(
                        dec, params, seq, P, args.batch, cached, args.repeats, dec.window
                    )
                row = dataclasses.make_dataclass("Row", ["mode", "cached", "P", "n", "sec"])(
                    mode, cached, P, n, sec
                )
                rows.append(row)
                print(
                    f"| {mode} | {'yes' if cached else 'no'} | {P} | {n} | "
                    f"{1000 * sec / n:.2f} | {args.batch / sec:.2f} |",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    main()
