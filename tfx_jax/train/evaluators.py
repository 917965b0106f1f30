"""Held-out evaluation during training (and for any params): the evaluators the loop runs.

evaluate       text perplexity and diffusion loss per timestep bucket over N batches
SampleGrid     images for held-out prompts drawn with the current params (generation on
               every process), a TensorBoard grid, and the source's judge score
run_evaluators runs them after the step's checkpoint; a failure is one line and a count
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from tfx_jax import artifacts
from tfx_jax.config import Config
from tfx_jax.data import sources
from tfx_jax.generate import sample
from tfx_jax.observability.metric_writers import image_grid

if TYPE_CHECKING:  # the loop imports this module; the trainer is only a parameter here
    from tfx_jax.train.loop import Trainer

log = logging.getLogger("tfx_jax")


def evaluate(trainer: Trainer, batches: Iterator[dict[str, np.ndarray]], num: int) -> dict:
    """Held-out text perplexity and diffusion loss per timestep bucket, averaged over batches."""
    totals: dict[str, Any] = {}
    for i in range(num):
        m = jax.device_get(trainer.eval_step(next(batches), jax.random.key(10_000 + i)))
        for k, v in m.items():
            totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
    out = {
        "eval/lm_loss": float(totals["lm_loss"] / num),
        "eval/diffusion_loss": float(totals["diffusion_loss"] / num),
    }
    out["eval/perplexity"] = float(math.exp(min(out["eval/lm_loss"], 50.0)))
    n_buckets = len(totals["bucket_count"])
    T = trainer.cfg.diffusion.num_timesteps
    for b in range(n_buckets):
        if totals["bucket_count"][b] > 0:
            lo = b * T // n_buckets
            key = f"eval/diffusion_loss_t{lo:04d}"
            out[key] = float(totals["bucket_loss_sum"][b] / totals["bucket_count"][b])
    return out


class SampleGrid:
    """Images for held-out captions, drawn with the current params at each eval: a picture of
    progress (TensorBoard `samples` image) plus the source's judge's score of it
    (`eval/judge_fraction`, `Source.score`: the shapes data; NaN for sources without a judge)."""

    def __init__(self, cfg: Config, num: int):
        self.source = sources.of(cfg)
        self.vae = artifacts.load_vae(cfg)
        self.tokenizer = artifacts.load_tokenizer(cfg)
        self.prompts = self.source.prompts(cfg, num)

    def __call__(self, trainer: Trainer) -> tuple[np.ndarray, float]:

        opts = sample.SampleOptions(
            max_new_tokens=2,
            temperature=0.0,
            sampler="ddim",
            diffusion_steps=20,
            guidance_scale=3.0,
        )
        prompts = [sample.Prompt(p, (), True) for p in self.prompts]
        results = sample.generate(
            trainer.cfg,
            trainer.state.params,
            self.tokenizer,
            prompts,
            opts,
            vae=self.vae,
            mesh=trainer.mesh,
        )
        pairs = [
            (r.images[0].image, p)
            for r, p in zip(results, self.prompts, strict=True)
            if r.images and r.images[0].image is not None
        ]
        if not pairs:
            return np.zeros((1, 1, 3), np.uint8), 0.0
        score = float(np.mean([self.source.score(img, p) for img, p in pairs]))  # NaN: no judge
        return image_grid(np.stack([img for img, _ in pairs]), cols=4), score


def run_evaluators(
    trainer: Trainer,
    batches: Iterator[dict[str, np.ndarray]],
    sampler: SampleGrid | None,
    step: int,
    writer: Any,
    failures: dict[str, int],
) -> dict[str, float]:
    """Runs the held-out evaluators and writes what they give.

    A failing evaluator is reported in one line and counted (`eval/failures`); training goes on
    unless `train.strict_eval`, which re-raises. Its exception never reaches the checkpoint
    (saved before the evaluators run) or the other evaluators' metrics.
    """
    out: dict[str, float] = {}

    def attempt(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:
            if trainer.cfg.train.strict_eval:
                raise
            failures[name] = failures.get(name, 0) + 1
            log.error(
                "eval at step %d: the %s evaluator failed (%s: %s); training goes on "
                "(train.strict_eval=true stops instead)",
                step,
                name,
                type(e).__name__,
                e,
            )

    def losses() -> None:
        out.update(evaluate(trainer, batches, trainer.cfg.train.eval_batches))

    def samples() -> None:
        grid, judged = sampler(trainer)
        if not math.isnan(judged):
            out["eval/judge_fraction"] = judged
        writer.write_images(step, {"samples": grid})

    attempt("losses", losses)
    if sampler is not None:
        attempt("sample grid", samples)
    out["eval/failures"] = float(sum(failures.values()))
    writer.write_scalars(step, out)
    return out
