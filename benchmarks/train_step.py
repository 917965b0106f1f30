"""Train-step throughput and MFU of a config on the local accelerator (synthetic packed batches),
beside a text-only step of the same model in the same run.

    python benchmarks/train_step.py --config experiments/transfusion.py:0.16b,synthetic \
        --set data.seq_len=4096 --set data.global_batch_size=8 --set model.attention_impl=cudnn

Needs no grain/TFDS (runs on the GPU machine as installed). Prints one table row per step kind:
tokens/s, step time, model TFLOP/s per device and MFU (FLOPs counted from the config by
tfx_jax.observability.flops), then the ratio of the Transfusion step's tokens/s to the text-only
step's. The text-only step is the same model and compiled train step on rows that are one causal
document each with no images (the mask is then plain causal), so the ratio is what interleaved
images cost. `--no-text-only` measures the Transfusion step alone.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from tfx_jax.config import Config, load_config
from tfx_jax.data.sources import synthetic
from tfx_jax.observability import flops
from tfx_jax.train.loop import Trainer


def text_only_batch(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows that are one causal text document each: no images, the mask is plain causal."""
    B, T = cfg.data.global_batch_size, cfg.data.seq_len
    m = cfg.model
    batch = synthetic.config_batch(cfg, rng)
    batch["tokens"] = rng.integers(6, m.vocab_size, (B, T), dtype=np.int32)
    batch["segment_ids"] = np.ones((B, T), np.int32)
    batch["positions"] = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    batch["image_ids"] = np.zeros((B, T), np.int32)
    batch["patches"] = np.zeros_like(batch["patches"])
    return batch


def images_in(batch: dict[str, np.ndarray]) -> int:
    ids = batch["image_ids"]
    return int(((ids > 0) & (np.roll(ids, 1, 1) != ids)).sum())


def measure(trainer: Trainer, host_batches, steps: int, warmup: int) -> tuple[float, dict]:
    batches = [trainer.put_batch(b) for b in host_batches]
    for i in range(warmup):
        jax.block_until_ready(trainer.train_step(batches[i % 2]))
    t0 = time.perf_counter()
    for i in range(steps):
        metrics = trainer.train_step(batches[i % 2])
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps, metrics


def row(cfg: Config, kind: str, dt: float, images: int) -> tuple[str, float]:
    fl = flops.train_flops_per_step(cfg, images_per_step=images)
    peak = flops.peak_flops_per_device(cfg.train.peak_tflops) or float("nan")
    n = jax.device_count()
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    text = (
        f"| {cfg.name} | {kind} | {n} x {jax.devices()[0].device_kind} | "
        f"{cfg.data.global_batch_size} x {cfg.data.seq_len} | {cfg.model.attention_impl} | "
        f"{dt * 1e3:.1f} | {tokens / dt:,.0f} | {fl / dt / n / 1e12:.1f} | "
        f"{100 * fl / dt / n / peak:.1f}% |"
    )
    return text, tokens / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="experiments/transfusion.py:0.16b,synthetic")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-text-only", dest="text_only", action="store_false")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    trainer.compile()
    compile_s = time.perf_counter() - t0
    mixed = [synthetic.config_batch(cfg, rng) for _ in range(2)]
    dt, metrics = measure(trainer, mixed, args.steps, args.warmup)
    print(
        "| config | step | devices | B x T | attention | step ms | tokens/s | TFLOP/s/dev | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    line, tps = row(cfg, "transfusion", dt, sum(map(images_in, mixed)) // 2)
    print(line)
    if args.text_only:  # the same compiled step; only the data differs
        text_dt, _ = measure(
            trainer, [text_only_batch(cfg, rng) for _ in range(2)], args.steps, args.warmup
        )
        line, text_tps = row(cfg, "text-only causal", text_dt, 0)
        print(line)
        print(f"transfusion / text-only tokens/s: {tps / text_tps:.3f}")
    print(f"(compile {compile_s:.1f} s; jax {jax.__version__}; loss {float(metrics['loss']):.3f})")


if __name__ == "__main__":
    main()
