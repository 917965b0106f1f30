"""Image latents in and out of the transformer (Transfusion §3.2, Fig. 3).

Two choices, as in the paper: a linear projection of each p x p x C patch, or U-Net down blocks
that reduce the latent to the patch grid (and U-Net up blocks with skip connections on the way
out). Both are conditioned on the diffusion timestep. Timesteps are given per patch (`t_BMI`), so
rolling diffusion, where rows of an image sit at different noise levels, uses the same layers.

Legend: B batch, M image slots, I patches per image, g patch grid side (I = g*g), D d_model,
P patch dim (p*p*C), h/w/C latent grid, E timestep-embedding width, c U-Net width.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfx_jax.layout import patchify, unpatchify
from tfx_jax.models.config import ModelConfig


def _init(names, scale: float = 1.0):
    return nn.with_logical_partitioning(
        nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal"), names
    )


def timestep_features(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal features of (integer) timesteps (Ho et al. 2020, App. B): [...] -> [..., dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedding(nn.Module):
    """t -> sinusoid -> MLP -> `features` (the embedding added to every image patch)."""

    features: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    freq_dim: int = 256

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        h = timestep_features(t, self.freq_dim)
        h = nn.Dense(
            self.features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_init((None, "embed")),
            name="fc1",
        )(h)
        h = nn.silu(h)
        return nn.Dense(
            self.features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_init((None, "embed")),
            name="fc2",
        )(h)


def _groups(c: int) -> int:
    return math.gcd(32, c)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv x2 with a timestep bias (the DDPM U-Net block, Ho et al. 2020)."""

    channels: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_NhwC: jax.Array, temb_NhwE: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv_init = _init((None, None, "conv_in", "conv_out"))
        h = nn.GroupNorm(_groups(x_NhwC.shape[-1]), **kw, name="norm1")(x_NhwC)
        h = nn.Conv(self.channels, (3, 3), kernel_init=conv_init, **kw, name="conv1")(nn.silu(h))
        h = h + nn.Dense(self.channels, kernel_init=_init((None, "conv_out")), **kw, name="temb")(
            nn.silu(temb_NhwE)
        )
        h = nn.GroupNorm(_groups(self.channels), **kw, name="norm2")(h)
        h = nn.Conv(
            self.channels,
            (3, 3),
            kernel_init=_init((None, None, "conv_in", "conv_out"), 1e-2),
            **kw,
            name="conv2",
        )(nn.silu(h))
        if x_NhwC.shape[-1] != self.channels:
            x_NhwC = nn.Conv(self.channels, (1, 1), kernel_init=conv_init, **kw, name="skip")(
                x_NhwC
            )
        return x_NhwC + h


def _temb_at(temb_NggE: jax.Array, size: int) -> jax.Array:
    """Nearest-upsamples per-patch embeddings from the patch grid to a `size` x `size` map."""
    factor = size // temb_NggE.shape[1]
    return jnp.repeat(jnp.repeat(temb_NggE, factor, axis=1), factor, axis=2)


class PatchEncoder(nn.Module):
    """Noisy latents [B, M, h, w, C] + per-patch timestep embeddings -> [B, M, I, D].

    Returns the patch embeddings and, for the U-Net, the skip activations for `PatchDecoder`.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, lat_BMhwC: jax.Array, temb_BMID: jax.Array):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        B, M, h, w, C = lat_BMhwC.shape
        g = h // cfg.patch_size
        if cfg.patch_encoder == "linear":
            x_BMIP = patchify(lat_BMhwC, cfg.patch_size).astype(dtype)
            x_BMID = nn.Dense(
                cfg.d_model,
                dtype=dtype,
                param_dtype=pdtype,
                kernel_init=_init(("patch", "embed")),
                name="proj",
            )(x_BMIP)
            return x_BMID + temb_BMID.astype(dtype), ()

        # U-Net down blocks: stage k runs at h / 2^k; the last stage is the patch grid.
        kw = dict(dtype=dtype, param_dtype=pdtype)
        temb_NggD = temb_BMID.reshape(B * M, g, g, -1)
        x = lat_BMhwC.reshape(B * M, h, w, C).astype(dtype)
        x = nn.Conv(
            cfg.unet_channels[0],
            (3, 3),
            kernel_init=_init((None, None, "conv_in", "conv_out")),
            **kw,
            name="conv_in",
        )(x)
        skips = []
        for k, c in enumerate(cfg.unet_channels):
            if k > 0:
                x = nn.Conv(
                    c,
                    (3, 3),
                    strides=(2, 2),
                    kernel_init=_init((None, None, "conv_in", "conv_out")),
                    **kw,
                    name=f"down{k}",
                )(x)
            x = ResBlock(c, dtype, pdtype, name=f"res{k}")(x, _temb_at(temb_NggD, x.shape[1]))
            skips.append(x)
        x = nn.Dense(cfg.d_model, kernel_init=_init(("conv_out", "embed")), **kw, name="proj")(x)
        x_BMID = x.reshape(B, M, g * g, cfg.d_model)
        return x_BMID + temb_BMID.astype(dtype), tuple(skips)


class PatchDecoder(nn.Module):
    """Transformer outputs at image positions [B, M, I, D] -> predicted noise [B, M, h, w, C]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        h_BMID: jax.Array,
        temb_BMID: jax.Array,
        skips: tuple,
        grid: tuple[int, int] | None = None,
    ) -> jax.Array:
        """`grid` = (rows, cols) of patches when not square (linear decoder only: a rolling
        window of patch rows); None = the square image grid."""
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        B, M, I, _ = h_BMID.shape
        g = int(round(I**0.5))
        if cfg.patch_encoder == "linear":
            # Near-zero init: the initial ε-prediction is ~0 (loss starts near E[ε²] = 1) while
            # gradients still reach every layer below from the first step.
            out_BMIP = nn.Dense(
                cfg.patch_dim,
                dtype=jnp.float32,
                param_dtype=pdtype,
                kernel_init=_init(("embed", "patch"), 1e-4),
                name="proj",
            )(h_BMID)
            return unpatchify(out_BMIP, cfg.patch_size, cfg.latent_channels, grid)

        kw = dict(dtype=dtype, param_dtype=pdtype)
        temb_NggD = temb_BMID.reshape(B * M, g, g, -1)
        x = nn.Dense(
            cfg.unet_channels[-1], kernel_init=_init(("embed", "conv_out")), **kw, name="proj"
        )(h_BMID.reshape(B * M, g, g, -1))
        for k in reversed(range(len(cfg.unet_channels))):
            c = cfg.unet_channels[k]
            x = jnp.concatenate([x, skips[k]], axis=-1)
            x = ResBlock(c, dtype, pdtype, name=f"res{k}")(x, _temb_at(temb_NggD, x.shape[1]))
            if k > 0:
                n, s = x.shape[0], x.shape[1]
                x = jax.image.resize(x, (n, 2 * s, 2 * s, x.shape[-1]), "nearest")
                x = nn.Conv(
                    cfg.unet_channels[k - 1],
                    (3, 3),
                    kernel_init=_init((None, None, "conv_in", "conv_out")),
                    **kw,
                    name=f"up{k}",
                )(x)
        x = nn.GroupNorm(_groups(x.shape[-1]), **kw, name="norm_out")(x)
        x = nn.Conv(
            cfg.latent_channels,
            (3, 3),
            dtype=jnp.float32,
            param_dtype=pdtype,
            kernel_init=_init((None, None, "conv_in", "conv_out"), 1e-4),
            name="conv_out",
        )(nn.silu(x))
        h = w = g * cfg.patch_size
        return x.reshape(B, M, h, w, cfg.latent_channels)
