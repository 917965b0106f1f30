"""The peer, side by side: transfusion-pytorch (torch.compile, flex attention) against ours.

    python benchmarks/compare_transfusion_pytorch.py --sizes 0.16b --out $OUT --deadline 420

For each size, in one invocation on one GPU: our train step (experiments/transfusion.py:SIZE,
synthetic through tfx_jax's Trainer, as benchmarks/train_step.py runs it) and the same-size model
of the `transfusion-pytorch` package (0.20.0; benchmark-only, never imported by tfx_jax), each in
its own subprocess, one after the other (jax and torch never hold GPU memory at once). Same
tokens per step on both sides: `--rows` rows of `--images-per-row` x (`--text-len` text tokens +
one 256-patch image); ours gets exactly that layout (B = rows, T = images x (text + 256), the
image markers taking two of the text positions; the package adds its own 4 specials per row).
The peer is fed latents directly (32 patch features per position through its linear projection,
no VAE), so the comparison is transformer against transformer: `Transformer(dim, depth, heads,
dim_head=64, use_flex_attn=True)` (flex attention is used on CUDA inputs), AdamW, bf16 autocast,
`torch.compile` of the whole model (`--torch-compile none`: eager, flex attention still compiled
by the package). Timing: warm up (compile), then `--steps` steps between cuda synchronizes.
Prints tokens/s of both and the ratio; writes compare_transfusion_pytorch.json after each piece.
`--smoke` runs ours alone on a tiny config (CPU-testable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

N_PATCHES = 256  # 32x32x8 latents, 2x2 patches (experiments/transfusion.py)
PATCH_DIM = 32  # 2 * 2 * 8
SIZES = {
    "0.16b": (16, 768, 12),
    "0.37b": (24, 1024, 16),
    "0.76b": (24, 1536, 24),
    "1.4b": (24, 2048, 16),
}


def layout_batch(cfg, rng, images_per_row: int, text_len: int) -> dict:
    """One document per row: images_per_row x (text, BOI, 256 patch slots, EOI), no padding."""
    import numpy as np

    from tfx_jax.data.sources.synthetic import BOI_ID, BOS_ID, EOI_ID, FIRST_TEXT_ID

    B, T, V = cfg.data.global_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    tokens = rng.integers(FIRST_TEXT_ID, V, (B, T)).astype(np.int32)
    image_ids = np.zeros((B, T), np.int32)
    patches = np.zeros((B, T, cfg.model.patch_dim), np.float32)
    n = cfg.model.num_patches
    if T != images_per_row * (text_len + n):
        raise ValueError(f"seq_len {T} != {images_per_row} x ({text_len} + {n} patches)")
    for k in range(images_per_row):
        start = k * (text_len + n) + text_len - 2  # the BOI; the EOI ends the span
        tokens[:, start], tokens[:, start + n + 1] = BOI_ID, EOI_ID
        sl = slice(start + 1, start + 1 + n)
        tokens[:, sl], image_ids[:, sl] = 0, k + 1
        patches[:, sl] = rng.standard_normal((B, n, cfg.model.patch_dim))
    tokens[:, 0] = BOS_ID
    return {
        "tokens": tokens,
        "segment_ids": np.ones((B, T), np.int32),
        "image_ids": image_ids,
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        "patches": patches,
    }


def run_ours(a) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_step import measure

    from tfx_jax.config import load_config
    from tfx_jax.observability import flops
    from tfx_jax.train.loop import Trainer, param_count

    config = "experiments/tiny.py" if a.smoke else f"experiments/transfusion.py:{a.size},synthetic"
    n = load_config(config, a.ours_set).model.num_patches  # 256 at the paper sizes
    T = a.images_per_row * (a.text_len + n)
    sets = [f"data.seq_len={T}", f"data.global_batch_size={a.rows}"] + a.ours_set
    cfg = load_config(config, sets)
    if cfg.model.patch_dim != PATCH_DIM and not a.smoke:
        raise ValueError(
            f"{config}: patch_dim {cfg.model.patch_dim}, this script assumes {PATCH_DIM}"
        )
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    trainer.compile()
    compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    batches = [layout_batch(cfg, rng, a.images_per_row, a.text_len) for _ in range(2)]
    dt, metrics = measure(trainer, batches, a.steps, a.warmup)
    fl = flops.train_flops_per_step(cfg, images_per_step=a.rows * a.images_per_row)
    peak = flops.peak_flops_per_device(cfg.train.peak_tflops) or float("nan")
    return {
        "side": "ours (tfx_jax)",
        "config": config,
        "overrides": sets,
        "params": param_count(trainer.state.params),
        "tokens_per_step": a.rows * T,
        "step_ms": dt * 1e3,
        "tokens_per_s": a.rows * T / dt,
        "mfu": fl / dt / peak,
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
        "attention_impl": cfg.model.attention_impl,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }


def run_torch(a) -> dict:
    import torch
    from transfusion_pytorch import Transfusion

    depth, dim, heads = SIZES[a.size]
    dev = torch.device("cuda")
    model = Transfusion(
        num_text_tokens=32_000,
        dim_latent=PATCH_DIM,
        modality_default_shape=(N_PATCHES,),
        transformer=dict(
            dim=dim, depth=depth, heads=heads, dim_head=dim // heads, use_flex_attn=True
        ),
    ).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    gen = torch.Generator(device=dev).manual_seed(0)

    def sample():  # a fresh list per step: the package mutates nothing, but be safe
        return [
            [
                x
                for _ in range(a.images_per_row)
                for x in (
                    torch.randint(0, 32_000, (a.text_len,), device=dev, generator=gen),
                    torch.randn(N_PATCHES, PATCH_DIM, device=dev, generator=gen),
                )
            ]
            for _ in range(a.rows)
        ]

    fwd = torch.compile(model) if a.torch_compile == "model" else model

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(sample())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for _ in range(a.warmup - 1):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    tokens = a.rows * a.images_per_row * (a.text_len + N_PATCHES)
    return {
        "side": "transfusion-pytorch",
        "torch_compile": a.torch_compile,
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": tokens,
        "step_ms": dt * 1e3,
        "tokens_per_s": tokens / dt,
        "first_step_s": first_s,
        "loss": float(loss),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


def child(side: str, a, timeout: float) -> dict:
    """Runs one side in a fresh interpreter; its last stdout line is the JSON result."""
    argv = [sys.executable, os.path.abspath(__file__), "--side", side, "--size", a.size]
    argv += [
        "--rows",
        str(a.rows),
        "--images-per-row",
        str(a.images_per_row),
        "--text-len",
        str(a.text_len),
    ]
    argv += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--torch-compile", a.torch_compile]
    argv += [x for s in a.ours_set for x in ("--ours-set", s)] + (["--smoke"] if a.smoke else [])
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"side": side, "error": f"timed out after {timeout:.0f} s (--deadline)"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"side": side, "error": f"exit {p.returncode}: {p.stderr[-1500:]}"}
    return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="0.16b", help="comma-separated, of " + ",".join(SIZES))
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--images-per-row", type=int, default=1)
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--torch-compile", choices=("model", "none"), default="model")
    p.add_argument("--ours-set", action="append", default=[], help="extra --set for our config")
    p.add_argument("--sides", default="ours,torch")
    p.add_argument("--deadline", type=float, default=420.0, help="seconds for the whole run")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/compare_transfusion_pytorch"))
    p.add_argument("--smoke", action="store_true", help="ours only, tiny config (CPU test)")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--size", default="0.16b", help=argparse.SUPPRESS)
    a = p.parse_args()
    for s in a.sizes.split(","):
        if s not in SIZES:
            p.error(f"--sizes: {s!r} is not one of {list(SIZES)}")
    if a.text_len < 3 or a.rows < 1 or a.images_per_row < 1:
        p.error("--text-len must be >= 3 (BOS and the image markers), --rows/--images-per-row >= 1")
    if a.side:  # a child: one side, one size; the JSON result is the last line
        print(json.dumps(run_ours(a) if a.side == "ours" else run_torch(a)))
        return
    t_start = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    sides = ["ours"] if a.smoke else a.sides.split(",")
    report = {"args": vars(a), "results": {}}
    for size in a.sizes.split(","):
        a.size, res = size, {}
        for side in sides:
            left = a.deadline - (time.perf_counter() - t_start)
            if left < 30:
                res[side] = {"side": side, "error": "skipped: --deadline reached"}
                continue
            res[side] = child(side, a, left)
            if side == "torch" and "error" in res[side] and a.torch_compile == "model":
                # A whole-model compile that breaks is a result; eager (flex attention still
                # compiled by the package) is the next best peer figure.
                left = a.deadline - (time.perf_counter() - t_start)
                if left > 60 and "timed out" not in res[side]["error"]:
                    res["torch_compile_error"] = res[side]["error"]
                    a.torch_compile = "none"
                    res[side] = child(side, a, left)
                    a.torch_compile = "model"
            report["results"][size] = res
            with open(os.path.join(a.out, "compare_transfusion_pytorch.json"), "w") as f:
                json.dump(report, f, indent=1)
        print(f"\n## {size}: {a.rows} rows x {a.images_per_row} x ({a.text_len} text + one image)")
        print("| side | params | tokens/step | step ms | tokens/s | first step / compile s |")
        print("|---|---|---|---|---|---|")
        for side, r in res.items():
            if not isinstance(r, dict):
                continue
            if "error" in r:
                print(f"| {side} | error: {r['error'][-300:]} |||||")
                continue
            print(
                f"| {r['side']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_step']:,} | "
                f"{r['step_ms']:.1f} | "
                f"{r['tokens_per_s']:,.0f} | {r.get('first_step_s', r.get('compile_s', 0)):.1f} |"
            )
        if all("tokens_per_s" in res.get(s, {}) for s in ("ours", "torch")):
            ratio = res["ours"]["tokens_per_s"] / res["torch"]["tokens_per_s"]
            res["ratio_ours_over_torch"] = ratio
            print(f"ours / transfusion-pytorch tokens/s: {ratio:.2f}x")
        with open(os.path.join(a.out, "compare_transfusion_pytorch.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
