"""Training the KL-VAE: loss, pure train/eval steps, latent scaling and a small driver.

The steps are pure functions of (state, batch, rng) with no sharding inside: callers jit them
with whatever in/out shardings their mesh needs. `train_vae` is the simple single-host driver
used by tests and the demo.

Loss (per image, as in LDM's `LPIPSWithDiscriminator` without its perceptual and GAN terms):
    sum_pixels |x - x_hat|  +  beta * KL(q(z|x) || N(0, I))
Both terms are divided by the number of pixel values H*W*3, so `recon` reads as a per-pixel error
and `kl_weight` keeps LDM's meaning (their beta = 1e-6 weighs the KL against the *summed*
reconstruction error).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tfx_jax.models.vae import VAE

RECON_LOSSES = ("l1", "mse")


# ---------------------------------------------------------------------------------------------
# Image conversion
# ---------------------------------------------------------------------------------------------


def uint8_to_float(images_uint8: jax.Array) -> jax.Array:
    """uint8 images in [0, 255] -> float32 in [-1, 1]."""
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def float_to_uint8(x: jax.Array) -> jax.Array:
    """Float images in [-1, 1] (values outside are clipped) -> uint8 in [0, 255], rounded."""
    return jnp.round((jnp.clip(x.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def _as_float(images: jax.Array) -> jax.Array:
    """Accepts uint8 images or float images already in [-1, 1]."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return uint8_to_float(images)
    return images.astype(jnp.float32)


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
        x_BHWC = _as_float(batch_images)
        step_rng = jax.random.fold_in(rng, state.step)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, x_BHWC, step_rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model: VAE) -> Callable[[dict, jax.Array], dict]:
    """Builds a pure, jittable eval step that reconstructs from the posterior mean.

    Returns:
      `eval_step(params, batch_images) -> metrics` with scalar `psnr` (dB) and `recon` (L1 per
      pixel value); `batch_images` is uint8 or float in [-1, 1].
    """

    def eval_step(params, batch_images: jax.Array) -> dict[str, jax.Array]:
        x_BHWC = _as_float(batch_images)
        x_hat_BHWC, _, _ = model.apply({"params": params}, x_BHWC)
        return {
            "psnr": jnp.mean(psnr(x_hat_BHWC, x_BHWC)),
            "recon": jnp.mean(reconstruction_error(x_hat_BHWC, x_BHWC, "l1")),
        }

    return eval_step


# ---------------------------------------------------------------------------------------------
# Latents for the diffusion model
# ---------------------------------------------------------------------------------------------


def latent_scale_factor(latents: jax.Array | np.ndarray) -> float:
    """LDM's scale factor: 1 / std of latents, so that `latents * factor` has unit variance.

    Computed once on the host over the posterior means of a sample of training images
    (Rombach et al. 2022, §4.3.2 and App. G) and stored with the VAE parameters.

    Args:
      latents: encoded images (unscaled posterior means), any shape.

    Returns:
      The scale factor, a Python float.
    """
    std = float(np.std(np.asarray(latents, dtype=np.float64)))
    if not np.isfinite(std) or std <= 0.0:
        raise ValueError(f"latents have std {std}; cannot compute a scale factor")
    return 1.0 / std


def encode_images(
    params, model: VAE, images_uint8: jax.Array, scale_factor: float | jax.Array
) -> jax.Array:
    """uint8 images [B, H, W, 3] -> scaled latents [B, h, w, latent_channels] (float32).

    Deterministic: uses the posterior mean. Jittable with `model` static (e.g. via
    `functools.partial`).
    """
    mean_BhwC, _ = model.apply({"params": params}, _as_float(images_uint8), method=VAE.encode)
    return mean_BhwC * scale_factor


def decode_latents(
    params, model: VAE, latents: jax.Array, scale_factor: float | jax.Array
) -> jax.Array:
    """Scaled latents [B, h, w, latent_channels] -> uint8 images [B, H, W, 3]."""
    x_hat_BHWC = model.apply({"params": params}, latents / scale_factor, method=VAE.decode)
    return float_to_uint8(x_hat_BHWC)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VAETrainResult:
    """What `train_vae` returns.

    Attributes:
      params: trained parameters (linen partitioning boxes removed).
      scale_factor: `latent_scale_factor` over the encoded training images.
      history: one dict of float metrics per logged step (with `step`, and `eval_psnr` when
        eval images were given).
      seconds_per_step: mean wall time of a step after the first (compiling) one.
    """

    params: dict
    scale_factor: float
    history: list[dict[str, float]]
    seconds_per_step: float


def train_vae(
    model: VAE,
    images_uint8: np.ndarray,
    *,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-6,
    recon: str = "l1",
    eval_images_uint8: np.ndarray | None = None,
    log_every: int = 50,
    seed: int = 0,
    scale_sample_size: int = 1024,
    log_fn: Callable[[dict[str, float]], None] | None = None,
) -> VAETrainResult:
    """Trains a VAE on in-memory images on the default device (single host, no sharding).

    Args:
      model: the VAE module.
      images_uint8: [N, H, W, 3] uint8 training images; batches are drawn without replacement
        from a seeded permutation per epoch (N >= batch_size).
      steps: optimizer steps.
      batch_size: images per step.
      learning_rate: Adam learning rate.
      kl_weight, recon: see `vae_loss`.
      eval_images_uint8: held-out images, evaluated (PSNR) at every log step.
      log_every: log interval in steps; the first and last steps are always logged.
      seed: seeds parameters, batch order and posterior noise.
      scale_sample_size: training images encoded to compute the latent scale factor.
      log_fn: called with each logged metrics dict (e.g. print).

    Returns:
      A `VAETrainResult`.
    """
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4:
        raise ValueError(
            f"images must be uint8 [N, H, W, C], got {images_uint8.dtype} {images_uint8.shape}"
        )
    num_images = images_uint8.shape[0]
    if num_images < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} images, got {num_images}")

    optimizer = optax.adam(learning_rate)
    rng_init, rng_steps = jax.random.split(jax.random.key(seed))
    init = functools.partial(init_state, model, optimizer, image_shape=images_uint8.shape[1:])
    state = jax.jit(init)(rng_init)
    train_step = jax.jit(
        make_train_step(model, optimizer, kl_weight=kl_weight, recon=recon), donate_argnums=0
    )
    eval_step = jax.jit(make_eval_step(model))

    order_rng = np.random.default_rng(seed)
    order, cursor = order_rng.permutation(num_images), 0
    history, step_times = [], []
    for step in range(steps):
        if cursor + batch_size > num_images:
            order, cursor = order_rng.permutation(num_images), 0
        batch = images_uint8[order[cursor : cursor + batch_size]]
        cursor += batch_size
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(train_step(state, batch, rng_steps))
        if step > 0:  # the first step compiles
            step_times.append(time.perf_counter() - start)
        if step == 0 or step % log_every == 0 or step == steps - 1:
            record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
            if eval_images_uint8 is not None:
                record["eval_psnr"] = float(eval_step(state.params, eval_images_uint8)["psnr"])
            history.append(record)
            if log_fn is not None:
                log_fn(record)

    params = flax.linen.meta.unbox(state.params)
    encode = jax.jit(lambda p, x: encode_images(p, model, x, 1.0))
    sample = images_uint8[:scale_sample_size]
    latents = np.concatenate(
        [
            np.asarray(encode(params, sample[i : i + batch_size]))
            for i in range(0, len(sample), batch_size)
        ]
    )
    return VAETrainResult(
        params=params,
        scale_factor=latent_scale_factor(latents),
        history=history,
        seconds_per_step=float(np.mean(step_times)) if step_times else float("nan"),
    )
