"""Train-step throughput and MFU of a config on the local accelerator (synthetic packed batches).

    python benchmarks/train_step.py --config experiments/transfusion.py:0.16b \
        --set data.seq_len=4096 --set data.global_batch_size=8 --set model.attention_impl=cudnn

Needs no grain/TFDS (runs on the GPU machine as installed). Prints one table row: tokens/s,
step time, model TFLOP/s per device and MFU (FLOPs counted from the config by
tfx_jax.observability.flops).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from tfx_jax.config import load_config
from tfx_jax.data.sources import synthetic
from tfx_jax.observability import flops
from tfx_jax.train.loop import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="experiments/transfusion.py:0.16b")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    m = cfg.model
    rng = np.random.default_rng(0)
    batches = [trainer.put_batch(synthetic.config_batch(cfg, rng)) for _ in range(2)]
    t0 = time.perf_counter()
    trainer.compile()
    compile_s = time.perf_counter() - t0
    for i in range(args.warmup):
        jax.block_until_ready(trainer.train_step(batches[i % 2]))
    t0 = time.perf_counter()
    for i in range(args.steps):
        metrics = trainer.train_step(batches[i % 2])
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t0) / args.steps
    images = (
        sum(
            int(((b["image_ids"] > 0) & (jax.numpy.roll(b["image_ids"], 1, 1) == 0)).sum())
            for b in batches
        )
        / 2
    )
    fl = flops.train_flops_per_step(cfg, images_per_step=int(images))
    peak = flops.peak_flops_per_device(cfg.train.peak_tflops) or float("nan")
    n = jax.device_count()
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    print("| config | devices | B x T | attention | step ms | tokens/s | TFLOP/s/dev | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {cfg.name} | {n} x {jax.devices()[0].device_kind} | {cfg.data.global_batch_size} x "
        f"{cfg.data.seq_len} | {m.attention_impl} | {dt * 1e3:.1f} | {tokens / dt:,.0f} | "
        f"{fl / dt / n / 1e12:.1f} | {100 * fl / dt / n / peak:.1f}% |"
    )
    print(f"(compile {compile_s:.1f} s; jax {jax.__version__}; loss {float(metrics['loss']):.3f})")


if __name__ == "__main__":
    main()
