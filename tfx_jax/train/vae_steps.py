"""The KL-VAE's loss and pure train/eval steps (the VAE's counterpart of `train.losses` and
`train.steps`); `train.vae_trainer.run` drives them.

The steps are pure functions of (state, batch, rng) with no sharding inside: callers jit them with
whatever in/out shardings their mesh needs.

Loss (per image, as in LDM's `LPIPSWithDiscriminator` without its perceptual and GAN terms):
    sum_pixels |x - x_hat|  +  beta * KL(q(z|x) || N(0, I))
Both terms are divided by the number of pixel values H*W*3, so `recon` reads as a per-pixel error
and `kl_weight` keeps LDM's meaning (their beta = 1e-6 weighs the KL against the *summed*
reconstruction error).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tfx_jax.models.vae import VAE, as_float, float_to_uint8

RECON_LOSSES = ("l1", "mse")

# ---------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over all non-batch axes.

    Kingma & Welling 2014, App. B: -KL = 1/2 * sum(1 + logvar - mean^2 - exp(logvar)).

    Args:
      mean, logvar: [B, ...] posterior moments.

    Returns:
      [B] KL in nats.
    """
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl.astype(jnp.float32), axis=tuple(range(1, kl.ndim)))


def reconstruction_error(x_hat: jax.Array, x: jax.Array, kind: str = "l1") -> jax.Array:
    """Per-example mean absolute ("l1") or squared ("mse") error over all non-batch axes.

    Returns:
      [B] errors, in units of the [-1, 1] image range.
    """
    if kind not in RECON_LOSSES:
        raise ValueError(f"recon loss must be one of {RECON_LOSSES}, got {kind!r}")
    diff = x_hat.astype(jnp.float32) - x.astype(jnp.float32)
    err = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def psnr(x_hat: jax.Array, x: jax.Array) -> jax.Array:
    """Per-example PSNR in dB of images in [-1, 1], measured on the [0, 1] scale.

    `x_hat` is clipped to [-1, 1] first, as it would be when saved as an image.

    Returns:
      [B] PSNR values (capped at 100 dB for exact reconstructions).
    """
    x_hat01 = (jnp.clip(x_hat.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
    x01 = (x.astype(jnp.float32) + 1.0) / 2.0
    mse = jnp.mean(jnp.square(x_hat01 - x01), axis=tuple(range(1, x.ndim)))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def vae_loss(
    x_hat: jax.Array,
    x: jax.Array,
    mean: jax.Array,
    logvar: jax.Array,
    *,
    kl_weight: float = 1e-6,
    recon: str = "l1",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reconstruction + beta * KL, normalised per pixel value (see the module docstring).

    Args:
      x_hat: [B, H, W, C] reconstructions.
      x: [B, H, W, C] targets in [-1, 1].
      mean, logvar: [B, h, w, c] posterior moments.
      kl_weight: beta; LDM's KL-VAEs use 1e-6.
      recon: "l1" (LDM) or "mse".

    Returns:
      (loss, metrics): scalar loss and a dict of scalars with `loss`, `recon` (per-pixel error),
      `kl` (nats per image), `psnr` (dB, [0, 1] scale).
    """
    recon_B = reconstruction_error(x_hat, x, recon)
    kl_B = kl_divergence(mean, logvar)
    pixels_per_image = np.prod(x.shape[1:])
    loss = jnp.mean(recon_B) + kl_weight * jnp.mean(kl_B) / pixels_per_image
    metrics = {
        "loss": loss,
        "recon": jnp.mean(recon_B),
        "kl": jnp.mean(kl_B),
        "psnr": jnp.mean(psnr(x_hat, x)),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# State and steps
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class VAETrainState:
    """Everything a VAE train step updates. A pytree; params may hold linen partitioning boxes."""

    step: jax.Array
    params: flax.core.FrozenDict | dict
    opt_state: optax.OptState


def init_state(
    model: VAE,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, ...],
) -> VAETrainState:
    """Initialises parameters and optimizer state. Pure: works under `jax.eval_shape`/`jax.jit`.

    Args:
      model: the VAE module.
      optimizer: an optax transformation.
      rng: PRNG key for the parameters.
      image_shape: (H, W, C) or (B, H, W, C) of the training images; the batch size does not
        affect the parameters.

    Returns:
      A state at step 0. Parameters (and Adam's moments) keep their `nn.LogicallyPartitioned`
      boxes, so `nn.get_partition_spec(jax.eval_shape(partial(init_state, model, optimizer,
      image_shape=...), rng))` gives the logical specs of the whole state.
    """
    if len(image_shape) not in (3, 4):
        raise ValueError(f"image_shape must be (H, W, C) or (B, H, W, C), got {image_shape}")
    x_1HWC = jnp.zeros((1, *image_shape[-3:]), jnp.float32)
    params = model.init(rng, x_1HWC)["params"]
    return VAETrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )


def make_train_step(
    model: VAE,
    optimizer: optax.GradientTransformation,
    *,
    kl_weight: float = 1e-6,
    recon: str = "l1",
) -> Callable[[VAETrainState, jax.Array, jax.Array], tuple[VAETrainState, dict]]:
    """Builds a pure, jittable VAE train step.

    Args:
      model: the VAE module.
      optimizer: the optax transformation `init_state` was built with.
      kl_weight: beta of `vae_loss`.
      recon: "l1" or "mse".

    Returns:
      `train_step(state, batch_images, rng) -> (state, metrics)`. `batch_images` is [B, H, W, 3],
      uint8 or float in [-1, 1]; `rng` is a base key (the step number is folded in, so the same
      key can be passed every step); metrics are float32 scalars (see `vae_loss`).
    """
    if recon not in RECON_LOSSES:
        raise ValueError(f"recon loss must be one of {RECON_LOSSES}, got {recon!r}")

    def loss_fn(params, x_BHWC, rng):
        x_hat_BHWC, mean_BhwC, logvar_BhwC = model.apply({"params": params}, x_BHWC, rng)
        return vae_loss(
            x_hat_BHWC, x_BHWC, mean_BhwC, logvar_BhwC, kl_weight=kl_weight, recon=recon
        )

    def train_step(state: VAETrainState, batch_images: jax.Array, rng: jax.Array):
        x_BHWC = as_float(batch_images)
        step_rng = jax.random.fold_in(rng, state.step)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, x_BHWC, step_rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model: VAE) -> Callable[[dict, jax.Array], tuple[jax.Array, jax.Array]]:
    """Builds a pure, jittable eval step that reconstructs from the posterior mean.

    Returns:
      `eval_step(params, batch_images) -> (reconstructions, psnr)`: uint8 [B, H, W, 3] images and
      per-image PSNR [B] in dB; `batch_images` is uint8 or float in [-1, 1].
    """

    def eval_step(params, batch_images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x_BHWC = as_float(batch_images)
        x_hat_BHWC, _, _ = model.apply({"params": params}, x_BHWC)
        return float_to_uint8(x_hat_BHWC), psnr(x_hat_BHWC, x_BHWC)

    return eval_step
