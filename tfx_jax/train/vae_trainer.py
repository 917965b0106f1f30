"""Training the KL-VAE: loss, pure train/eval steps, latent scaling and two drivers.

The steps are pure functions of (state, batch, rng) with no sharding inside: callers jit them
with whatever in/out shardings their mesh needs. Two drivers use them:

  run        `python -m tfx_jax vae`: the main trainer's machinery (mesh over all devices,
             sharded batches, JSONL + TensorBoard metrics, Orbax checkpoints with exact resume,
             SIGTERM handling); returns the params, latent scale factor and held-out PSNR.
  train_vae  a minimal single-device loop for tests and notebooks (no files, no resume).

Loss (per image, as in LDM's `LPIPSWithDiscriminator` without its perceptual and GAN terms):
    sum_pixels |x - x_hat|  +  beta * KL(q(z|x) || N(0, I))
Both terms are divided by the number of pixel values H*W*3, so `recon` reads as a per-pixel error
and `kl_weight` keeps LDM's meaning (their beta = 1e-6 weighs the KL against the *summed*
reconstruction error).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tfx_jax.models.vae import VAE

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------
# `python -m tfx_jax vae`: the sharded, logged, checkpointed driver
# ---------------------------------------------------------------------------------------------

CHECKPOINT_DIR = "checkpoints"
STALE_CHECKPOINT_DIR = "checkpoints.stale"
SCALE_SAMPLE_SIZE = 1024  # training images encoded for the latent scale factor
GRID_IMAGES = 8  # held-out originals (top row) and reconstructions (bottom row) in the grid


class VAEPreempted(SystemExit):
    """Raised by `run` after SIGTERM, once the checkpoint of the current step is durable.

    A `SystemExit` with code 0, so `python -m tfx_jax vae` exits cleanly as `train` does, and no
    caller can mistake a half-trained VAE for a finished one (nothing is exported, no latents are
    encoded); the next run resumes from the checkpoint. Catch it to do otherwise.
    """

    def __init__(self, step: int):
        super().__init__(0)
        self.step = step


def resume_settings(cfg: Any, train_images_uint8: np.ndarray) -> dict[str, Any]:
    """Everything that determines the VAE's training trajectory, as JSON-able values.

    A checkpoint resumes only if its saved settings equal these. `vae.steps` is deliberately not
    one of them: the learning rate is constant, so a run to N steps passes through exactly the
    states of a run to k < N steps, and raising `vae.steps` continues a finished run. The mesh is
    not one either (a checkpoint restores onto any mesh). The training images are fingerprinted,
    since the batch order is a function of their count and the seed.
    """
    v = cfg.vae
    images = np.ascontiguousarray(train_images_uint8)
    return {
        "latent_channels": cfg.model.latent_channels,
        "downsample": v.downsample,
        "channels": list(v.channels),
        "batch_size": v.batch_size,
        "learning_rate": v.learning_rate,
        "kl_weight": v.kl_weight,
        "recon": "l1",
        "image_size": cfg.data.image_size,
        "seed": cfg.data.seed,
        "train_images": len(images),
        "train_images_sha256": hashlib.sha256(images.data).hexdigest(),
    }


def settings_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every setting that differs (missing keys read as None)."""
    return [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, num_images: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(num_images)


def batch_indices(step: int, num_images: int, batch_size: int, seed: int) -> np.ndarray:
    """Training-image indices of the global batch for `step` (0-based): a pure function.

    Each epoch is a fresh permutation seeded by (seed, epoch), cut into `num_images // batch_size`
    batches (the remainder is dropped). Every process computes the same global batch from the step
    alone, so batch order needs no iterator state: it is exact on resume and independent of the
    number of processes.
    """
    steps_per_epoch = num_images // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"need at least batch_size={batch_size} images, got {num_images}")
    epoch, within = divmod(step, steps_per_epoch)
    return _epoch_order(seed, epoch, num_images)[within * batch_size : (within + 1) * batch_size]


def put_images(
    images_uint8: np.ndarray, indices: np.ndarray, batch_sharding: jax.sharding.Sharding
) -> jax.Array:
    """The global batch `images_uint8[indices]` as one array sharded by `batch_sharding`.

    Every process holds all images, so each one materialises exactly the rows its own devices
    hold (whatever the device order of the mesh) and contributes nothing else: the multi-process
    equivalent of `sharding.put_global_batch` without a per-process data pipeline. Images stay
    uint8 on the way to the devices (a quarter of the float32 bytes).
    """
    shape = (len(indices), *images_uint8.shape[1:])

    def rows(index: tuple[slice, ...]) -> np.ndarray:
        return images_uint8[indices[index[0]]][(slice(None), *index[1:])]

    return jax.make_array_from_callback(shape, batch_sharding, rows)


def _chunks(num: int, size: int):
    """(indices, valid) per chunk of `size` over range(num); the last chunk repeats its final
    index so every chunk has the shape the compiled functions expect."""
    for start in range(0, num, size):
        valid = min(size, num - start)
        yield np.minimum(np.arange(start, start + size), num - 1), valid


def _check_images(name: str, images: np.ndarray, image_size: int) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (image_size, image_size, 3):
        raise ValueError(
            f"{name} must be uint8 [N, {image_size}, {image_size}, 3] (data.image_size="
            f"{image_size}), got {images.dtype} {images.shape}"
        )
    if len(images) == 0:
        raise ValueError(f"{name} is empty")
    return images


@contextlib.contextmanager
def _sigterm_flag():
    """SIGTERM (preemption) sets `flag["requested"]`; the loop saves at the next step boundary.

    As in `tfx_jax.train.loop`: each process acts on its own signal (preemption notices reach every
    host of a slice together).
    """
    flag = {"requested": False}

    def handler(signum, frame):
        logger.warning("SIGTERM: saving a VAE checkpoint at the next step boundary, then exiting")
        flag["requested"] = True

    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: nothing to install
        previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _resume_step(ckpt_dir, settings: dict, steps: int, log: Callable[[str], None]) -> int | None:
    """The step to resume from, or None to start fresh.

    A checkpoint whose settings differ (or that is already past `steps`, so it cannot give the
    state at `steps`) is moved aside to `checkpoints.stale` (replacing an older one) rather than
    deleted, and the run says so.
    """
    from jax.experimental import multihost_utils

    from tfx_jax.checkpoint import Checkpointer

    probe = Checkpointer(ckpt_dir, async_save=False)
    latest = probe.latest_step()
    saved = probe.read_meta(latest).get("settings", {}) if latest is not None else None
    probe.close()
    if latest is None:
        return None
    diffs = settings_differences(saved, settings)
    if not diffs and latest <= steps:
        return latest
    why = (
        f"different settings ({'; '.join(diffs)})"
        if diffs
        else f"step {latest} > vae.steps={steps}"
    )
    stale = ckpt_dir.parent / STALE_CHECKPOINT_DIR
    log(f"VAE: checkpoint {ckpt_dir} step {latest} has {why}; starting fresh (moved to {stale})")
    if jax.process_index() == 0:
        if stale.exists():
            stale.rmtree()
        ckpt_dir.rename(stale)
    multihost_utils.sync_global_devices("tfx_jax.train.vae_trainer: stale checkpoints moved")
    return None


@dataclasses.dataclass(frozen=True)
class _Programs:
    """The jitted pieces of a VAE run on one mesh, with explicit in/out shardings.

    The VAE's parameters (and Adam's moments) name their axes conv_in/conv_out, and the
    project's rules map these to no mesh axis, so the whole state is replicated: right for a small
    conv net, whose weights are a few MB and whose cost is activations, which the batch sharding
    splits. A rules table that maps them to `fsdp` would shard the state with no change here.
    """

    state_shardings: Any
    batch_sharding: jax.sharding.NamedSharding
    init: Callable  # rng -> state, created already sharded (never whole on one device)
    train_step: Callable  # (state, uint8 batch, rng) -> (state, metrics); state donated
    reconstruct: Callable  # (params, uint8 batch) -> (uint8 reconstructions, PSNR [B])
    encode: Callable  # (params, uint8 batch) -> unscaled posterior means


@functools.lru_cache(maxsize=2)
def _programs(
    model: VAE,
    learning_rate: float,
    kl_weight: float,
    image_shape: tuple[int, ...],
    mesh: jax.sharding.Mesh,
    rules: tuple,
) -> _Programs:
    """Builds (and caches) the jitted functions for these settings.

    Cached so that another `run` with the same settings in this process (a resume, the tests, a
    notebook) reuses the same `jax.jit` objects and hence their compiled executables; jit's own
    cache still keys on shapes, shardings and jax's config, so a hit is always safe.
    """
    from tfx_jax import sharding

    optimizer = optax.adam(learning_rate)
    init = functools.partial(init_state, model, optimizer, image_shape=image_shape)
    state_shardings = sharding.tree_shardings(mesh, rules, jax.eval_shape(init, jax.random.key(0)))
    batch_shard = sharding.batch_sharding(mesh, rules, 1 + len(image_shape))
    params_shard, repl = state_shardings.params, sharding.replicated(mesh)

    def reconstruct(params, images_uint8):
        x_BHWC = uint8_to_float(images_uint8)
        x_hat_BHWC, _, _ = model.apply({"params": params}, x_BHWC)
        return float_to_uint8(x_hat_BHWC), psnr(x_hat_BHWC, x_BHWC)

    return _Programs(
        state_shardings=state_shardings,
        batch_sharding=batch_shard,
        init=jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=state_shardings),
        train_step=jax.jit(
            make_train_step(model, optimizer, kl_weight=kl_weight),
            in_shardings=(state_shardings, batch_shard, repl),
            out_shardings=(state_shardings, repl),
            donate_argnums=(0,),
        ),
        # Small outputs (per-image PSNR, a chunk of images, latents) come back replicated, so
        # every process can read them whole.
        reconstruct=jax.jit(
            reconstruct, in_shardings=(params_shard, batch_shard), out_shardings=repl
        ),
        encode=jax.jit(
            lambda params, x: encode_images(params, model, x, 1.0),
            in_shardings=(params_shard, batch_shard),
            out_shardings=repl,
        ),
    )


def _hashable_rules(rules) -> tuple:
    """Rules as nested tuples (a config rebuilt from JSON holds lists)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def _evaluate(programs: _Programs, params, held_out: np.ndarray, chunk: int):
    """(mean per-image PSNR over all held-out images, grid image).

    Held-out images go through the batch-sharded reconstruction in chunks of `chunk` images (the
    last one padded, its padding dropped). The grid shows the first `GRID_IMAGES` originals above
    their reconstructions.
    """
    from tfx_jax.observability.metric_writers import image_grid

    psnrs, first = [], None
    for indices, valid in _chunks(len(held_out), chunk):
        batch = put_images(held_out, indices, programs.batch_sharding)
        x_hat, psnr_B = jax.device_get(programs.reconstruct(params, batch))
        psnrs.append(psnr_B[:valid])
        first = x_hat[:valid] if first is None else first
    n = min(GRID_IMAGES, len(first))
    grid = image_grid(np.concatenate([held_out[:n], first[:n]]), cols=n)
    return float(np.mean(np.concatenate(psnrs))), grid


def _scale_factor(programs: _Programs, params, images: np.ndarray, chunk: int) -> float:
    """`latent_scale_factor` over the posterior means of the first `SCALE_SAMPLE_SIZE` training
    images, encoded batch-sharded (padding rows dropped before the statistics)."""
    sample = images[:SCALE_SAMPLE_SIZE]
    latents = []
    for indices, valid in _chunks(len(sample), chunk):
        batch = put_images(sample, indices, programs.batch_sharding)
        latents.append(np.asarray(jax.device_get(programs.encode(params, batch)))[:valid])
    return latent_scale_factor(np.concatenate(latents))


def _fmt(scalars: dict[str, float]) -> str:
    keys = ("vae/loss", "vae/recon", "vae/psnr", "vae/eval_psnr")
    return "  ".join(f"{k[4:]} {scalars[k]:.4g}" for k in keys if k in scalars)


def run(
    cfg: Any,
    train_images_uint8: np.ndarray,
    eval_images_uint8: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains the VAE of `cfg` to `cfg.vae.steps` on all devices, resuming from `out_dir`.

    Data parallel over the mesh's batch axes (`act_batch`: data x fsdp), state replicated (see
    `_Programs`). Every `vae.log_every` steps (and at the last): train scalars and held-out
    PSNR to `out_dir/metrics.jsonl` and `out_dir/tensorboard/`, with a grid of held-out originals
    above their reconstructions (TensorBoard image `vae/reconstructions`). Every
    `vae.checkpoint_every` steps and at the last: an Orbax checkpoint in `out_dir/checkpoints`
    (state + settings; `checkpoint.keep` kept, saved asynchronously if `checkpoint.async_save`).

    Resume: a checkpoint whose `resume_settings` equal the current ones continues from its latest
    step and ends with the same params as an uninterrupted run; any other is moved aside and the
    run starts fresh. SIGTERM: the current step is saved and `VAEPreempted` (exit code 0) raised.

    Args:
      cfg: the run's `Config` (vae.*, model.latent_channels, data.image_size, data.seed, mesh.*,
        checkpoint.keep / async_save).
      train_images_uint8: [N, S, S, 3] uint8, S = data.image_size, N >= vae.batch_size; every
        process passes all of them (each one feeds only its devices' rows of every batch).
      eval_images_uint8: [M, S, S, 3] uint8 held-out images (PSNR only; never trained on).
      out_dir: the run directory, created if missing (metrics are written with local file
        APIs, as in `train`).
      log: called with human-readable progress lines, on process 0 only.

    Returns:
      {"params": unboxed host (numpy) params, "scale_factor": float, "heldout_psnr_db": float
      (mean per-image PSNR of the posterior-mean reconstructions of all held-out images),
      "steps": int (the final step), "seconds_per_step": float (mean wall time of this call's
      steps after its first, which compiles; eval and checkpoint time excluded; NaN if fewer than
      two ran), "resumed_from_step": int or None, "history": the logged scalars, "mesh_shape":
      {axis: size}}.

    Raises:
      VAEPreempted: after SIGTERM, once the checkpoint is written.
    """
    from etils import epath
    from tqdm.auto import tqdm

    from tfx_jax import sharding
    from tfx_jax.checkpoint import Checkpointer, abstract_like
    from tfx_jax.config import validate
    from tfx_jax.observability import metric_writers

    validate(cfg)
    v, seed = cfg.vae, cfg.data.seed
    images = _check_images("train_images_uint8", train_images_uint8, cfg.data.image_size)
    held_out = _check_images("eval_images_uint8", eval_images_uint8, cfg.data.image_size)
    is_main = jax.process_index() == 0
    say = log if is_main else (lambda msg: None)
    out_dir = str(out_dir)
    if "://" not in out_dir:  # Orbax/TensorStore need absolute local paths
        out_dir = os.path.abspath(out_dir)
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    mesh = sharding.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    ways = sharding.batch_parallel_size(mesh, rules)
    if v.batch_size % ways:
        raise ValueError(
            f"vae.batch_size={v.batch_size} is not divisible by the batch-parallel size {ways} "
            f"of mesh {dict(mesh.shape)}: change vae.batch_size or mesh.*"
        )
    if len(images) < v.batch_size:
        raise ValueError(f"need at least vae.batch_size={v.batch_size} images, got {len(images)}")

    model = VAE(
        latent_channels=cfg.model.latent_channels,
        downsample=v.downsample,
        channels=tuple(v.channels),
    )
    rng_init, rng_steps = jax.random.split(jax.random.key(seed))
    ckpt_dir = out_dir / CHECKPOINT_DIR
    settings = resume_settings(cfg, images)
    resumed_from = _resume_step(ckpt_dir, settings, v.steps, say)

    with contextlib.ExitStack() as cleanup:  # closed in reverse, on success or error
        ckpt = Checkpointer(
            ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        cleanup.callback(ckpt.close)  # waits for an async save still in flight
        writer = metric_writers.make_writers(str(out_dir), is_main)
        cleanup.callback(writer.close)
        cleanup.enter_context(sharding.mesh_context(mesh, cfg))

        programs = _programs(
            model,
            v.learning_rate,
            v.kl_weight,
            images.shape[1:],
            mesh,
            _hashable_rules(cfg.mesh.rules),
        )
        state = programs.init(rng_init)
        if resumed_from is not None:
            state, _ = ckpt.restore(resumed_from, abstract_like(state, programs.state_shardings))
        start = step = int(state.step)
        say(
            f"VAE: {len(images)} training / {len(held_out)} held-out images, mesh "
            f"{dict(mesh.shape)}, global batch {v.batch_size}, steps {start} -> {v.steps} "
            f"({f'resumed from {ckpt_dir}' if resumed_from is not None else 'fresh start'})"
        )

        history: list[dict[str, float]] = []
        bar = tqdm(total=v.steps, initial=step, desc="vae", disable=not is_main, dynamic_ncols=True)
        cleanup.callback(bar.close)
        # Step time: wall time between host syncs, minus eval/checkpoint work and the first step
        # of this call (which compiles).
        train_seconds, timed_steps, t_last = 0.0, 0, None
        with _sigterm_flag() as preempt:
            while step < v.steps:
                indices = batch_indices(step, len(images), v.batch_size, seed)
                batch = put_images(images, indices, programs.batch_sharding)
                state, metrics = programs.train_step(state, batch, rng_steps)
                step += 1
                bar.update(1)
                log_now = step % v.log_every == 0 or step == v.steps or preempt["requested"]
                save_now = step % v.checkpoint_every == 0 or step == v.steps
                if not (log_now or save_now or step == start + 1):
                    continue  # steps stay queued on the devices: no host sync
                metrics = jax.device_get(metrics)  # waits for the step
                if t_last is not None:
                    train_seconds += time.perf_counter() - t_last
                    timed_steps = step - start - 1
                if log_now:
                    scalars = {f"vae/{k}": float(x) for k, x in metrics.items()}
                    scalars["vae/eval_psnr"], grid = _evaluate(
                        programs, state.params, held_out, v.batch_size
                    )
                    writer.write_scalars(step, scalars)
                    writer.write_images(step, {"vae/reconstructions": grid})
                    history.append({"step": step, **scalars})
                    bar.set_postfix_str(_fmt(scalars))
                    with bar.external_write_mode():
                        say(f"  vae step {step:>6}  {_fmt(scalars)}")
                stop = preempt["requested"]  # re-read: a signal during eval saves this step
                if save_now or stop:
                    ckpt.save(step, state, None, {"settings": settings, "step": step})
                t_last = time.perf_counter()
                if stop:
                    break
        ckpt.wait()  # the last save is durable before anything is reported
        if preempt["requested"] and step < v.steps:
            say(f"VAE: preempted; checkpoint of step {step} written to {ckpt_dir}")
            raise VAEPreempted(step)
        heldout_psnr, _ = _evaluate(programs, state.params, held_out, v.batch_size)
        scale = _scale_factor(programs, state.params, images, v.batch_size)
        replicate = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))
        params = jax.device_get(replicate(state.params))  # whole on every process

    say(f"VAE: step {step}, held-out PSNR {heldout_psnr:.2f} dB, latent scale factor {scale:.4g}")
    return {
        "params": params,
        "scale_factor": scale,
        "heldout_psnr_db": heldout_psnr,
        "steps": step,
        "seconds_per_step": train_seconds / timed_steps if timed_steps else float("nan"),
        "resumed_from_step": resumed_from,
        "history": history,
        "mesh_shape": dict(mesh.shape),
    }
