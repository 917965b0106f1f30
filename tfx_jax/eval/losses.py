"""Held-out losses of any params: text perplexity and diffusion loss, overall, per timestep
bucket and per patch row, always over the same batches.

The loss itself is the train step's (`train.steps.make_eval_step`): this module takes it as a
parameter (`EvalStep`, `LossEval`), so the eval package never imports the trainer and training's
evaluator (`train/evaluators.py`) and the `eval` command aggregate the same numbers.

    rewind(batches)                              every evaluation reads the same batches
    loss_metrics(eval_step, batches, num, diffusion)
                                                 any eval step: the trainer's or `LossEval`'s
    LossEval(cfg, mesh, pure_step)(params, ...)  the pure eval step jitted with the trainer's
                                                 shardings onto restored params
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from tfx_jax import layout, sharding
from tfx_jax import params as params_lib
from tfx_jax.config import Config, DiffusionConfig
from tfx_jax.sharding import mesh_context

# `(batch, rng) -> metrics`: lm_loss, diffusion_loss, bucket_loss_sum/bucket_count [buckets],
# row_loss_sum/row_count [patch rows] (`train.steps.make_eval_step` bound to params).
EvalStep = Callable[[dict, jax.Array], dict]
# `(params, batch, rng) -> metrics`: the same, unbound (`train.steps.make_eval_step(model, cfg)`).
PureEvalStep = Callable[[Any, dict, jax.Array], dict]
# `(model, cfg) -> PureEvalStep`: `train.steps.make_eval_step` (what `eval` is given).
MakeEvalStep = Callable[[Any, Config], PureEvalStep]

_START = "_tfx_eval_start"  # where an eval iterator stood when it was first evaluated


def rewind(batches: Iterator) -> None:
    """Makes every evaluation read the same batches: the first call remembers the iterator's
    position (Grain's `get_state`), later calls go back to it (`set_state`). So eval losses
    compare across steps, and equal `python -m tfx_jax eval`'s, which starts a fresh iterator.
    An iterator without that protocol just continues."""
    if not (hasattr(batches, "get_state") and hasattr(batches, "set_state")):
        return
    start = getattr(batches, _START, None)
    if start is None:
        try:
            setattr(batches, _START, batches.get_state())
        except AttributeError:  # an iterator that takes no attributes: it continues
            pass
    else:
        batches.set_state(start)


def loss_metrics(
    eval_step: EvalStep,
    batches: Iterator[dict[str, np.ndarray]],
    num: int,
    diffusion: DiffusionConfig,
) -> dict[str, float]:
    """Held-out text perplexity and diffusion loss (overall, per timestep bucket, per patch row),
    averaged over `num` batches of `batches` (rewound: the same batches every time).

    Args:
      eval_step: `(batch, rng) -> metrics` of `train.steps.make_eval_step` (`Trainer.eval_step`,
        or a `LossEval` bound to params).
      batches: this process's validation batches.
      num: batches to average over.
      diffusion: the run's diffusion section (its timesteps set the buckets).
    """
    rewind(batches)
    totals: dict[str, Any] = {}
    for i in range(num):
        m = jax.device_get(eval_step(next(batches), jax.random.key(10_000 + i)))
        for k, v in m.items():
            totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
    out = {
        "eval/lm_loss": float(totals["lm_loss"] / num),
        "eval/diffusion_loss": float(totals["diffusion_loss"] / num),
    }
    out["eval/perplexity"] = float(math.exp(min(out["eval/lm_loss"], 50.0)))
    n_buckets = len(totals["bucket_count"])
    T = diffusion.num_timesteps
    for b in range(n_buckets):
        if totals["bucket_count"][b] > 0:
            lo = b * T // n_buckets
            out[f"eval/diffusion_loss_t{lo:04d}"] = float(
                totals["bucket_loss_sum"][b] / totals["bucket_count"][b]
            )
    for r, count in enumerate(totals.get("row_count", ())):
        if count > 0:
            out[f"eval/diffusion_loss_row{r:02d}"] = float(totals["row_loss_sum"][r] / count)
    return out


class LossEval:
    """The train step's eval losses for any params, jitted with the trainer's shardings (params
    by their logical names, batches over data x fsdp), so `eval` computes exactly what
    training's evaluator computes.

    Args:
      cfg: the run's config.
      mesh: the mesh the params live on.
      pure_step: `(params, batch, rng) -> metrics` (`train.steps.make_eval_step(model, cfg)`).
    """

    def __init__(self, cfg: Config, mesh: Mesh, pure_step: PureEvalStep):
        self.cfg, self.mesh = cfg, mesh
        rules = cfg.mesh.rules
        batch_shardings = {
            k: sharding.batch_sharding(mesh, rules, len(v.shape))
            for k, v in layout.batch_spec(cfg).items()
        }
        self._step = jax.jit(
            pure_step,
            in_shardings=(
                params_lib.param_shardings(cfg, mesh),
                batch_shardings,
                sharding.replicated(mesh),
            ),
            out_shardings=sharding.replicated(mesh),
        )

    def __call__(self, params: Any, batch: dict[str, Any], rng: jax.Array) -> dict:
        arrays = {k: v for k, v in batch.items() if not k.startswith("stats/")}
        if isinstance(next(iter(arrays.values())), np.ndarray):
            arrays = sharding.put_global_batch(arrays, self.mesh, self.cfg.mesh.rules)
        with mesh_context(self.mesh, self.cfg):
            return self._step(params, arrays, rng)
