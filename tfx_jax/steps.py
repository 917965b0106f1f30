"""Pure train and eval steps: functions of (state, batch, rng), jitted by `tfx_jax.train`.

One step of the Transfusion objective (Zhou et al. 2024, §3.3):
  1. find the image slots of the packed batch and read each image's clean latent x_0;
  2. draw t ~ U{0..T-1} per image and ε ~ N(0, I); x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (noise is added to
     the latent before patchifying, so the U-Net sees a spatially coherent noisy latent);
  3. one forward pass gives next-token logits and ε̂ for every image;
  4. L = L_LM + λ · L_DDPM.
Gradient accumulation scans over micro-batches and averages their gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tfx_jax import diffusion, layout, losses
from tfx_jax.config import Config


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def forward_losses(
    params: Any,
    model: nn.Module,
    cfg: Config,
    schedule: diffusion.Schedule,
    batch: dict[str, jax.Array],
    rng: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The total loss of one (micro-)batch and its metrics."""
    m = cfg.model
    M = cfg.max_images_per_row
    seg, img = batch["segment_ids"], batch["image_ids"]
    slot_BT, start_BM, valid_BM = layout.image_slots(seg, img, M)
    clean_BMIP = layout.gather_image_tokens(batch["patches"], start_BM, m.num_patches)
    x0_BMhwC = layout.unpatchify(clean_BMIP, m.patch_size, m.latent_channels)

    t_rng, noise_rng = jax.random.split(rng)
    B = seg.shape[0]
    t_BM = jax.random.randint(t_rng, (B, M), 0, schedule.num_timesteps)
    eps_BMhwC = jax.random.normal(noise_rng, x0_BMhwC.shape, jnp.float32)
    xt_BMhwC = diffusion.q_sample(schedule, x0_BMhwC, t_BM, eps_BMhwC)
    t_BMI = jnp.broadcast_to(t_BM[:, :, None], (B, M, m.num_patches))

    logits_BTV, eps_hat_BMhwC = model.apply(
        {"params": params},
        batch["tokens"],
        seg,
        batch["positions"],
        img,
        slot_BT,
        start_BM,
        xt_BMhwC,
        t_BMI,
    )
    text_mask_BT = layout.text_target_mask(seg, img)
    lm, ce, n_text = losses.lm_loss(logits_BTV, batch["tokens"], text_mask_BT, cfg.train.z_loss)
    ddpm, _, n_img = losses.diffusion_loss(eps_hat_BMhwC, eps_BMhwC, valid_BM)
    total = lm + cfg.diffusion.loss_weight * ddpm
    metrics = {
        "loss": total,
        "lm_loss": ce,
        "diffusion_loss": ddpm,
        "text_tokens": n_text,
        "images": n_img,
        "tokens": (seg > 0).sum().astype(jnp.float32),
    }
    return total, metrics


def _split_micro(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """[B, ...] -> [n, B/n, ...] taking every n-th row, so each micro-batch keeps rows on every
    batch shard (a plain reshape would put micro-batch 0 on the first devices only)."""

    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        names = (None, "act_batch") + (None,) * (x.ndim - 2)
        return nn.with_logical_constraint(x, names)

    return jax.tree.map(split, batch)


def make_train_step(
    model: nn.Module, cfg: Config, tx: optax.GradientTransformation, lr_fn: Callable
) -> Callable:
    """Returns train_step(state, batch, rng) -> (state, metrics); pure, to be jitted."""
    schedule = diffusion.make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    accum = cfg.optimizer.grad_accum_steps
    grad_fn = jax.value_and_grad(
        lambda p, b, r: forward_losses(p, model, cfg, schedule, b, r), has_aux=True
    )

    def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        if accum == 1:
            (_, metrics), grads = grad_fn(state.params, batch, rng)
        else:
            micro = _split_micro(batch, accum)

            def body(carry, xs):
                g_acc, m_acc = carry
                b, i = xs
                (_, m), g = grad_fn(state.params, b, jax.random.fold_in(rng, i))
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

            zeros_g = jax.tree.map(jnp.zeros_like, state.params)
            zeros_m = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype),
                jax.eval_shape(
                    lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), rng)[0][1]
                ),
            )
            (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), (micro, jnp.arange(accum)))
            grads = jax.tree.map(lambda g: g / accum, grads)
            counts = ("text_tokens", "images", "tokens")
            metrics = {k: v if k in counts else v / accum for k, v in metrics.items()}
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = lr_fn(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, cfg: Config) -> Callable:
    """Returns eval_step(params, batch, rng) -> metrics (same losses, no gradient)."""
    schedule = diffusion.make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)

    def eval_step(params: Any, batch: dict[str, jax.Array], rng: jax.Array):
        return forward_losses(params, model, cfg, schedule, batch, rng)[1]

    return eval_step
