"""Held-out evaluation during training: the evaluators the loop runs at `train.eval_every`.

They call the same code as `python -m tfx_jax eval` (`tfx_jax.eval`), so a step's logged
eval metrics are what `eval --step N` computes for the same batches and prompts:

evaluate       text perplexity and diffusion loss per timestep bucket and per patch row over
               `train.eval_batches` validation batches (the same batches every eval)
SampleGrid     `train.eval_samples` images per prompt split drawn with the current params
               (generation on every process), a TensorBoard grid, the judge's scores per
               attribute / split / grid row, and scored captions for the true images
run_evaluators runs them after the step's checkpoint; a failure is one line and a count

They read the trainer through `Evaluated` (what `train.loop.Trainer` has), so this module never
imports the loop, which imports it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from tfx_jax.config import Config
from tfx_jax.eval.losses import loss_metrics
from tfx_jax.eval.prompts import Prompting, sample_grid

log = logging.getLogger("tfx_jax")


class Evaluated(Protocol):
    """What the evaluators read of the model being trained (`train.loop.Trainer` is one)."""

    cfg: Config
    mesh: Mesh
    state: Any  # its `.params` are evaluated

    def eval_step(self, batch: dict[str, Any], rng: jax.Array | None = None) -> dict:
        """`train.steps.make_eval_step`'s metrics for the current params."""
        ...


def evaluate(trainer: Evaluated, batches: Iterator[dict[str, np.ndarray]], num: int) -> dict:
    """Held-out text perplexity and diffusion loss (per timestep bucket and patch row),
    averaged over `num` batches (`eval.losses.loss_metrics` with the trainer's eval step)."""
    return loss_metrics(trainer.eval_step, batches, num, trainer.cfg.diffusion)


class SampleGrid:
    """Images for the captions of `num` examples per prompt split (the shapes data: train and
    held-out combinations; other sources: validation), drawn with the current params at each
    eval, and captions for their true images: a picture of progress (TensorBoard `samples`)
    and the judge's scores (`eval/judge/...`, `eval/judge_fraction`, `eval/caption/...`; for
    sources without a judge, the grid alone). The examples are chosen once
    (`eval.prompts.Prompting`)."""

    def __init__(self, cfg: Config, num: int):
        self.prompting = Prompting(cfg, num)

    def __call__(self, trainer: Evaluated) -> tuple[np.ndarray, dict[str, float]]:
        # Captions are only worth their decoding time where they are scored.
        drawn, _, metrics = self.prompting(
            trainer.cfg,
            trainer.state.params,
            trainer.mesh,
            captions=self.prompting.judge is not None,
        )
        return sample_grid(drawn), metrics


def run_evaluators(
    trainer: Evaluated,
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
        out.update({k: v for k, v in judged.items() if not math.isnan(v)})
        writer.write_images(step, {"samples": grid})

    attempt("losses", losses)
    if sampler is not None:
        attempt("sample grid", samples)
    out["eval/failures"] = float(sum(failures.values()))
    writer.write_scalars(step, out)
    return out
