"""Train-step throughput and MFU of a config on the local accelerator, on synthetic packed
batches, beside two text-only references of the same model and compiled step in the same run.

    python benchmarks/train_step.py --config experiments/transfusion.py:0.16b,synthetic \
        --set data.seq_len=4096 --set data.global_batch_size=8 --set model.attention_impl=cudnn

Needs no grain/TFDS (runs on the GPU machine as installed). Batches (`--mix`):
  paper   (default) Transfusion §4.1's mix (`synthetic.paper_mix_batch`): half the tokens text
          from documents of long-tailed length (median 400, some whole rows), half image patches
          from image-caption documents (caption first 80%).
  images  the synthetic source's own rows (`synthetic.config_batch`): short texts, 0-2 images a
          document, ~95% image tokens.
Rows printed, each from the same compiled train step (only the data differs):
  transfusion       the mixed batch;
  text, same pack   the mixed batch's documents (segments, positions) with every image token
                    turned into text: the same packing, a causal mask per document — the ratio
                    to it is what images cost;
  text, 1 doc/row   rows that are one causal document each (plain causal mask).
Columns: tokens/s, step time, and two MFUs. "MFU" is the MaxText convention
(`flops.train_flops_per_step`: attention counted as half of each row's T x T square, whatever the
packing); "MFU visible" counts attention only on the (query, key) pairs the batch's mask lets
attend (`flops.visible_pairs`: causal inside documents, both ways inside images), the useful work;
"visible" is those pairs over the causal half-square. Then the Transfusion row's tokens/s over each
reference's. `--no-text-only` measures the Transfusion step alone.
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

MIXES = ("paper", "images")


def mixed_batch(cfg: Config, rng: np.random.Generator, mix: str) -> dict[str, np.ndarray]:
    if mix == "images":
        return synthetic.config_batch(cfg, rng)
    m = cfg.model
    return synthetic.paper_mix_batch(
        rng, cfg.data.global_batch_size, cfg.data.seq_len, m.vocab_size, m.latent_size,
        m.latent_channels, m.patch_size, cfg.max_images_per_row,
    )  # fmt: skip


def as_text(batch: dict[str, np.ndarray], cfg: Config, rng: np.random.Generator) -> dict:
    """The same documents (segments, positions) with every image token turned into text."""
    out = dict(batch)
    image = batch["image_ids"] > 0
    words = rng.integers(synthetic.FIRST_TEXT_ID, cfg.model.vocab_size, image.shape, np.int32)
    out["tokens"] = np.where(image, words, batch["tokens"])
    out["image_ids"] = np.zeros_like(batch["image_ids"])
    out["patches"] = np.zeros_like(batch["patches"])
    return out


def one_document_per_row(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows that are one causal text document each: no images, the mask is plain causal."""
    B, T = cfg.data.global_batch_size, cfg.data.seq_len
    batch = as_text(synthetic.config_batch(cfg, rng), cfg, rng)
    batch["tokens"] = rng.integers(synthetic.FIRST_TEXT_ID, cfg.model.vocab_size, (B, T), np.int32)
    batch["segment_ids"] = np.ones((B, T), np.int32)
    batch["positions"] = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
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


def row(cfg: Config, kind: str, dt: float, host_batches: list[dict]) -> tuple[str, float]:
    """One table row for batches `host_batches` (their mean) stepping in `dt` seconds."""
    images = sum(map(images_in, host_batches)) / len(host_batches)
    pairs = np.mean([flops.visible_pairs(b["segment_ids"], b["image_ids"]) for b in host_batches])
    maxtext = flops.train_flops_per_step(cfg, images_per_step=images)
    visible = flops.train_flops_per_step(cfg, images_per_step=images, attention_pairs=pairs)
    B, T = cfg.data.global_batch_size, cfg.data.seq_len
    peak = flops.peak_flops_per_device(cfg.train.peak_tflops) or float("nan")
    n = jax.device_count()
    text = (
        f"| {cfg.name} | {kind} | {n} x {jax.devices()[0].device_kind} | {B} x {T} | "
        f"{cfg.model.attention_impl} | {dt * 1e3:.1f} | {B * T / dt:,.0f} | "
        f"{100 * maxtext / dt / n / peak:.1f}% | {100 * visible / dt / n / peak:.1f}% | "
        f"{100 * pairs / (B * T * (T + 1) / 2):.0f}% | "
        f"{100 * images * cfg.model.num_patches / (B * T):.0f}% |"
    )
    return text, B * T / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="experiments/transfusion.py:0.16b,synthetic")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--mix", choices=MIXES, default="paper")
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
    mixed = [mixed_batch(cfg, rng, args.mix) for _ in range(2)]
    dt, metrics = measure(trainer, mixed, args.steps, args.warmup)
    print(
        "| config | batch | devices | B x T | attention | step ms | tokens/s | MFU | MFU visible "
        "| visible | image tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    line, tps = row(cfg, f"transfusion ({args.mix})", dt, mixed)
    print(line)
    if args.text_only:
        references = {
            "text, same pack": [as_text(b, cfg, rng) for b in mixed],
            "text, 1 doc/row": [one_document_per_row(cfg, rng) for _ in range(2)],
        }
        ratios = []
        for kind, batches in references.items():
            ref_dt, _ = measure(trainer, batches, args.steps, args.warmup)
            line, ref_tps = row(cfg, kind, ref_dt, batches)
            print(line)
            ratios.append(f"÷ {kind}: {tps / ref_tps:.3f}")
        print("transfusion tokens/s " + "; ".join(ratios))
    print(f"(compile {compile_s:.1f} s; jax {jax.__version__}; loss {float(metrics['loss']):.3f})")


if __name__ == "__main__":
    main()
