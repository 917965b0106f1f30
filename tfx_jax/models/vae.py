"""Convolutional KL-regularised autoencoder (the image tokenizer of Transfusion).

The architecture follows the KL-VAE of Latent Diffusion (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", App. G, `AutoencoderKL`): a ResNet encoder that
downsamples by `downsample` and predicts a diagonal Gaussian posterior over `latent_channels`
channels, and a mirrored decoder. Transfusion (Zhou et al. 2024, §4.1) uses 8 latent channels
with 8x downsampling, the defaults here. Left out, to stay small and fast: the self-attention in
the middle blocks, the 1x1 `quant_conv`s (folded into the output convs) and the perceptual/GAN
losses (no pretrained LPIPS weights can be downloaded here).

Images are NHWC in [-1, 1]. Parameters carry logical axis names (conv kernels
(None, None, "conv_in", "conv_out"), biases and norm parameters ("conv_out",)) that the project's
rules table maps to mesh axes.

The inference codec lives here too, beside the model: `Codec` (a trained VAE with its latent
scale factor) and the pure functions under it (`encode_images`, `decode_latents`, the uint8
conversions and `latent_scale_factor`). Data encoding and generation use these alone; training
(`tfx_jax.train.vae_trainer`) is never imported for inference.

Shape legend:
  B: batch
  H, W: image height and width
  h, w: latent height and width (H / downsample, W / downsample)
  C: channels (3 for images, `latent_channels` for latents)
  D: feature width inside the network (changes from stage to stage)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# LDM's DiagonalGaussianDistribution clamps the log-variance to this range so that exp() stays
# finite early in training.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _conv(features: int, kernel: int, strides: int, name: str, dtype, param_dtype) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding="SAME",
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


def num_groups(width: int, max_groups: int = 32) -> int:
    """GroupNorm groups for a width: LDM's 32 at width >= 128, else keeping >= 4 channels per group.

    With one channel per group GroupNorm becomes InstanceNorm, which removes every channel's
    spatial mean: the colour of a flat image region, exactly what a VAE must carry.
    """
    return math.gcd(width, min(max_groups, max(1, width // 4)))


def _norm(width: int, max_groups: int, name: str, dtype, param_dtype) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=num_groups(width, max_groups),
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1-projected when widths differ) skip."""

    width: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWD: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _norm(x_BHWD.shape[-1], self.norm_groups, "norm1", **kw)(x_BHWD)
        h = _conv(self.width, 3, 1, "conv1", **kw)(nn.silu(h))
        h = _norm(self.width, self.norm_groups, "norm2", **kw)(h)
        h = _conv(self.width, 3, 1, "conv2", **kw)(nn.silu(h))
        skip = x_BHWD
        if x_BHWD.shape[-1] != self.width:
            skip = _conv(self.width, 1, 1, "skip", **kw)(x_BHWD)
        return skip + h


def upsample_nearest_2x(x_BHWD: jax.Array) -> jax.Array:
    """[B, H, W, D] -> [B, 2H, 2W, D] by repeating pixels.

    A broadcast and a reshape: its gradient is a sum, where `jax.image.resize(..., "nearest")`
    lowers to a gather whose gradient is a scatter-add, slow on XLA:CPU.
    """
    b, h, w, d = x_BHWD.shape
    x = jnp.broadcast_to(x_BHWD[:, :, None, :, None, :], (b, h, 2, w, 2, d))
    return x.reshape(b, 2 * h, 2 * w, d)


def stage_widths(channels: Sequence[int], downsample: int) -> tuple[int, ...]:
    """Widths of the log2(downsample) + 1 resolution levels.

    Args:
      channels: base widths, at most one per level; a shorter tuple repeats its last width for
        the remaining levels (LDM's f=8 model uses widths (1, 2, 4, 4) x 128 in the same way).
      downsample: 4 or 8.

    Returns:
      One width per level, full resolution first.
    """
    if downsample not in (4, 8):
        raise ValueError(f"downsample must be 4 or 8, got {downsample}")
    num_levels = int(math.log2(downsample)) + 1
    if not channels or len(channels) > num_levels:
        raise ValueError(
            f"channels needs 1 to {num_levels} widths for downsample={downsample}, got {channels}"
        )
    return tuple(channels) + (channels[-1],) * (num_levels - len(channels))


class Encoder(nn.Module):
    """Image [B, H, W, 3] -> posterior moments [B, h, w, 2 * latent_channels]."""

    latent_channels: int
    widths: tuple[int, ...]
    num_res_blocks: int
    norm_groups: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blk = dict(norm_groups=self.norm_groups, **kw)
        h = _conv(self.widths[0], 3, 1, "conv_in", **kw)(x_BHWC)
        for level, width in enumerate(self.widths):
            for i in range(self.num_res_blocks):
                h = ResBlock(width, name=f"down{level}_res{i}", **blk)(h)
            if level < len(self.widths) - 1:
                # Learned stride-2 conv, as in LDM's Downsample(with_conv=True).
                h = _conv(width, 3, 2, f"down{level}_downsample", **kw)(h)
        h = ResBlock(self.widths[-1], name="mid_res", **blk)(h)
        h = nn.silu(_norm(self.widths[-1], self.norm_groups, "norm_out", **kw)(h))
        return _conv(2 * self.latent_channels, 3, 1, "conv_out", **kw)(h)


class Decoder(nn.Module):
    """Latent [B, h, w, latent_channels] -> image [B, H, W, 3] (unbounded; ~[-1, 1])."""

    out_channels: int
    widths: tuple[int, ...]
    num_res_blocks: int
    norm_groups: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, z_BhwC: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blk = dict(norm_groups=self.norm_groups, **kw)
        h = _conv(self.widths[-1], 3, 1, "conv_in", **kw)(z_BhwC)
        h = ResBlock(self.widths[-1], name="mid_res", **blk)(h)
        for level in reversed(range(len(self.widths))):
            # One block more than the encoder, as in LDM's decoder.
            for i in range(self.num_res_blocks + 1):
                h = ResBlock(self.widths[level], name=f"up{level}_res{i}", **blk)(h)
            if level > 0:
                # Nearest-neighbour x2 then conv3x3 (LDM's Upsample) avoids checkerboard
                # artefacts of transposed convolutions.
                h = upsample_nearest_2x(h)
                # LDM keeps the coarser width here; narrowing to the finer level's width in
                # this conv (already at the finer resolution) costs half or less.
                h = _conv(self.widths[level - 1], 3, 1, f"up{level}_upsample", **kw)(h)
        h = nn.silu(_norm(self.widths[0], self.norm_groups, "norm_out", **kw)(h))
        return _conv(self.out_channels, 3, 1, "conv_out", **kw)(h)


def reparameterize(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Draws z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) (Kingma & Welling 2014, §2.4).

    Args:
      rng: PRNG key.
      mean, logvar: posterior moments, same shape.

    Returns:
      A sample with the shape and dtype of `mean`.
    """
    eps = jax.random.normal(rng, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


class VAE(nn.Module):
    """KL-regularised convolutional autoencoder (LDM's AutoencoderKL, simplified).

    The defaults are a CPU-sized model (~0.4M parameters, ~5.5 GFLOP per train step at batch 32,
    32x32) that still reconstructs the synthetic shapes data well (~38 dB PSNR after 4k Adam
    steps at lr 2e-3). LDM's kl-f8 model is `channels=(128, 256, 512, 512), num_res_blocks=2`.

    Attributes:
      latent_channels: channels of the latent (8 in Transfusion).
      downsample: spatial reduction factor, 4 or 8 (2 or 3 stride-2 stages).
      channels: base width per resolution level, full resolution first; see `stage_widths`.
      num_res_blocks: ResBlocks per encoder level; the decoder uses one more, as in LDM. 0 still
        leaves one ResBlock per decoder level and the middle blocks (the fast default).
      norm_groups: GroupNorm groups at most (see `num_groups`; fewer for widths below 128).
      image_channels: 3 for RGB.
      dtype: computation dtype (posterior moments are always returned in float32).
      param_dtype: parameter dtype.

    Methods (call through `model.apply(params, ..., method=VAE.<name>)`):
      __call__(x_BHWC, rng=None) -> (x_hat_BHWC, mean_BhwC, logvar_BhwC)
      encode(x_BHWC) -> (mean_BhwC, logvar_BhwC)
      sample(mean_BhwC, logvar_BhwC, rng) -> z_BhwC
      decode(z_BhwC) -> x_hat_BHWC
    """

    latent_channels: int = 8
    downsample: int = 8
    channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: int = 0
    norm_groups: int = 32
    image_channels: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        widths = stage_widths(self.channels, self.downsample)
        common = dict(
            widths=widths,
            num_res_blocks=self.num_res_blocks,
            norm_groups=self.norm_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.image_channels, **common)

    def encode(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior q(z|x) = N(mean, exp(logvar)).

        Args:
          x_BHWC: images in [-1, 1]; H and W must be multiples of `downsample`.

        Returns:
          (mean_BhwC, logvar_BhwC), float32, C = latent_channels; logvar clamped to [-30, 20].
        """
        _, height, width, _ = x_BHWC.shape
        if height % self.downsample or width % self.downsample:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of downsample={self.downsample}"
            )
        moments_Bhw2C = self.encoder(x_BHWC).astype(jnp.float32)
        mean_BhwC, logvar_BhwC = jnp.split(moments_Bhw2C, 2, axis=-1)
        return mean_BhwC, jnp.clip(logvar_BhwC, LOGVAR_MIN, LOGVAR_MAX)

    def sample(self, mean_BhwC: jax.Array, logvar_BhwC: jax.Array, rng: jax.Array) -> jax.Array:
        """Reparameterised sample from the posterior (see `reparameterize`)."""
        return reparameterize(rng, mean_BhwC, logvar_BhwC)

    def decode(self, z_BhwC: jax.Array) -> jax.Array:
        """Latents [B, h, w, latent_channels] -> images [B, H, W, 3] (not clipped; ~[-1, 1])."""
        return self.decoder(z_BhwC)

    def __call__(
        self, x_BHWC: jax.Array, rng: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Autoencodes images.

        Args:
          x_BHWC: images in [-1, 1].
          rng: key for the posterior sample; None decodes the posterior mean (deterministic).

        Returns:
          (x_hat_BHWC, mean_BhwC, logvar_BhwC).
        """
        mean_BhwC, logvar_BhwC = self.encode(x_BHWC)
        z_BhwC = mean_BhwC if rng is None else self.sample(mean_BhwC, logvar_BhwC, rng)
        return self.decode(z_BhwC), mean_BhwC, logvar_BhwC


# ---------------------------------------------------------------------------------------------
# The inference codec: uint8 images <-> scaled latents
# ---------------------------------------------------------------------------------------------


def uint8_to_float(images_uint8: jax.Array) -> jax.Array:
    """uint8 images in [0, 255] -> float32 in [-1, 1]."""
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def float_to_uint8(x: jax.Array) -> jax.Array:
    """Float images in [-1, 1] (values outside are clipped) -> uint8 in [0, 255], rounded."""
    return jnp.round((jnp.clip(x.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def as_float(images: jax.Array) -> jax.Array:
    """Accepts uint8 images or float images already in [-1, 1]; returns float32 in [-1, 1]."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return uint8_to_float(images)
    return images.astype(jnp.float32)


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

    Deterministic: uses the posterior mean. Jittable with `model` static (`Codec.encode` is).
    """
    mean_BhwC, _ = model.apply({"params": params}, as_float(images_uint8), method=VAE.encode)
    return mean_BhwC * scale_factor


def decode_latents(
    params, model: VAE, latents: jax.Array, scale_factor: float | jax.Array
) -> jax.Array:
    """Scaled latents [B, h, w, latent_channels] -> uint8 images [B, H, W, 3]."""
    x_hat_BHWC = model.apply({"params": params}, latents / scale_factor, method=VAE.decode)
    return float_to_uint8(x_hat_BHWC)


# Compiled once per (model, shapes, placement); the scale factor is an argument, not a constant.
_encode_jit = jax.jit(encode_images, static_argnames="model")
_decode_jit = jax.jit(decode_latents, static_argnames="model")


class Codec(NamedTuple):
    """A trained VAE for inference: images <-> the scaled latents the diffusion model sees.

    A named tuple, so `model, params, scale_factor = codec` unpacks it.

    Attributes:
      model: the VAE module.
      params: its (unboxed) parameters; placed where the computation should run.
      scale_factor: `latent_scale_factor` of the training latents.
    """

    model: VAE
    params: Any
    scale_factor: float

    def encode(self, images_uint8: jax.Array | np.ndarray) -> jax.Array:
        """uint8 images [B, H, W, 3] -> scaled latents [B, h, w, latent_channels] (float32)."""
        return _encode_jit(self.params, self.model, images_uint8, self.scale_factor)

    def decode(self, latents: jax.Array | np.ndarray) -> jax.Array:
        """Scaled latents [B, h, w, latent_channels] -> uint8 images [B, H, W, 3]."""
        return _decode_jit(self.params, self.model, latents, self.scale_factor)
