"""Pure train and eval steps: functions of (state, batch, rng), jitted by `tfx_jax.train.loop`.

One step of the Transfusion objective (Zhou et al. 2024, §3.3):
  1. find the image slots of the packed batch and read each image's clean latent x_0;
  2. draw t ~ U{0..T-1} per image and ε ~ N(0, I); x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (noise is added to
     the latent before patchifying, so the U-Net sees a spatially coherent noisy latent);
     with `diffusion.noise_limit_image_first`, images that precede their caption draw t <= 500
     of 1000 (Transfusion §4.3); with `diffusion.mode=rolling`, every patch row gets its own
     level and the loss covers the rolling window (`tfx_jax.diffusion.rolling`);
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

from tfx_jax import layout
from tfx_jax.config import Config
from tfx_jax.diffusion import ddpm, modes
from tfx_jax.train import losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    skipped: jax.Array  # updates skipped because the loss or gradient was not finite


def forward_losses(
    params: Any,
    model: nn.Module,
    cfg: Config,
    schedule: ddpm.Schedule,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    with_details: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The total loss of one (micro-)batch and its metrics (per-image details if asked)."""
    m = cfg.model
    M = cfg.max_images_per_row
    seg, img = batch["segment_ids"], batch["image_ids"]
    slot_BT, start_BM, valid_BM = layout.image_slots(seg, img, M)
    clean_BMIP = layout.gather_image_tokens(batch["patches"], start_BM, m.num_patches)
    x0_BMhwC = layout.unpatchify(clean_BMIP, m.patch_size, m.latent_channels)

    t_rng, noise_rng = jax.random.split(rng)
    B = seg.shape[0]
    dc = cfg.diffusion
    t_BM = jax.random.randint(t_rng, (B, M), 0, schedule.num_timesteps)
    if dc.noise_limit_image_first:
        # Transfusion §4.3: an image followed by its caption gets t <= 500 (of 1000), drawn
        # uniformly in that range, so the caption is learned from a recognisable image.
        cap = 500 * schedule.num_timesteps // 1000
        limited_BM = jax.random.randint(jax.random.fold_in(t_rng, 1), (B, M), 0, cap + 1)
        t_BM = jnp.where(layout.image_first(batch["tokens"], img, start_BM), limited_BM, t_BM)
    eps_BMhwC = jax.random.normal(noise_rng, x0_BMhwC.shape, jnp.float32)
    # The mode (tfx_jax.diffusion.modes) noises the slots: one t per image, or rolling rows.
    mode = modes.of(dc.mode)
    noised = mode.noise(
        jax.random.fold_in(t_rng, 2),
        dc,
        schedule,
        x0_BMhwC,
        eps_BMhwC,
        t_BM,
        img,
        slot_BT,
        start_BM,
        m.patch_size,
    )
    xt_BMhwC, t_BMI, t_BM, attn_img = (
        noised.xt_BMhwC,
        noised.t_BMI,
        noised.t_BM,
        noised.attn_image_ids_BT,
    )

    inputs = layout.ModelInputs(
        tokens=batch["tokens"],
        segment_ids=seg,
        positions=batch["positions"],
        image_ids=attn_img,
        slots=slot_BT,
        starts=start_BM,
        noisy_latents=xt_BMhwC,
        timesteps=t_BMI,
    )
    out = model.apply({"params": params}, inputs)
    logits_BTV, eps_hat_BMhwC = out.logits, out.eps
    text_mask_BT = layout.text_target_mask(seg, img)
    if not cfg.train.lm_loss_before_images:  # no loss for predicting a caption before its image
        before_BT = layout.text_before_image(seg, img)
        text_mask_BT &= ~jnp.pad(before_BT[:, 1:], ((0, 0), (0, 1)))
    lm, ce, n_text = losses.lm_loss(logits_BTV, batch["tokens"], text_mask_BT, cfg.train.z_loss)
    ddpm_loss, per_image_BM, n_img = mode.loss(
        eps_hat_BMhwC, eps_BMhwC, valid_BM, m.patch_size, noised
    )
    total = lm + cfg.diffusion.loss_weight * ddpm_loss
    metrics = {
        "loss": total,
        "lm_loss": ce,
        "diffusion_loss": ddpm_loss,
        "text_tokens": n_text,
        "images": n_img,
        "tokens": (seg > 0).sum().astype(jnp.float32),
    }
    if with_details:
        metrics["t_BM"], metrics["per_image_BM"], metrics["valid_BM"] = t_BM, per_image_BM, valid_BM
        # ε-MSE per patch row (issue 15: quality from the first row to the last), weighted as
        # the loss weights it (rolling: only the window's rows count).
        g = m.latent_size // m.patch_size
        err = jnp.square(eps_hat_BMhwC.astype(jnp.float32) - eps_BMhwC.astype(jnp.float32))
        metrics["row_loss_BMR"] = err.reshape(B, M, g, -1).mean(-1)
        row_w = jnp.ones((B, M, g), jnp.float32)
        if noised.weight_BMI is not None:  # rolling: only the window's rows count
            row_w = noised.weight_BMI.reshape(B, M, g, -1).mean(-1)
        metrics["row_weight_BMR"] = row_w * valid_BM[..., None].astype(jnp.float32)
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
    schedule = ddpm.make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
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
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss or gradient never reaches the weights: keep the old params and
        # optimizer state, count it (train.nan_policy decides whether the loop goes on).
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = lr_fn(state.step)
        metrics["finite"] = finite.astype(jnp.float32)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            skipped=state.skipped + (1 - finite.astype(jnp.int32)),
        )
        metrics["skipped"] = new_state.skipped
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, cfg: Config, num_buckets: int = 10) -> Callable:
    """Returns eval_step(params, batch, rng) -> metrics (no gradient).

    Besides the losses it returns, per timestep bucket b (t in [b·T/n, (b+1)·T/n)), the sum of
    per-image diffusion losses and the image count, and per patch row the weighted sum of row
    losses and the weight, so the caller can average over batches.
    """
    schedule = ddpm.make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    width = schedule.num_timesteps / num_buckets

    def eval_step(params: Any, batch: dict[str, jax.Array], rng: jax.Array):
        _, m = forward_losses(params, model, cfg, schedule, batch, rng, with_details=True)
        bucket_BM = jnp.floor(m.pop("t_BM") / width).astype(jnp.int32)
        per_image, valid = m.pop("per_image_BM"), m.pop("valid_BM").astype(jnp.float32)
        onehot_BMK = jax.nn.one_hot(bucket_BM, num_buckets) * valid[..., None]
        m["bucket_loss_sum"] = (onehot_BMK * per_image[..., None]).sum(axis=(0, 1))
        m["bucket_count"] = onehot_BMK.sum(axis=(0, 1))
        row_w = m.pop("row_weight_BMR")
        m["row_loss_sum"] = (m.pop("row_loss_BMR") * row_w).sum(axis=(0, 1))
        m["row_count"] = row_w.sum(axis=(0, 1))
        return m

    return eval_step
