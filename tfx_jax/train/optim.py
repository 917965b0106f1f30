"""The optimizer: AdamW with warmup + cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from tfx_jax.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay to `min_lr_ratio · learning_rate`."""
    decay_steps = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps,
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def _last_name(path: tuple[Any, ...]) -> str:
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: everything except norm scales and biases.

    Decided by parameter name, not rank, because scanned layers add a leading layer dim
    (a stacked RMSNorm scale is 2-D).
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _last_name(path) not in ("scale", "bias"), params
    )


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        # 0 = no clipping (both states are empty: the tree is the same either way)
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(
            learning_rate_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        ),
    )
