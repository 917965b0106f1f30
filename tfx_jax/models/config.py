"""The `model` section of the config (`ModelConfig`) and its checks, beside the model code.

`tfx_jax.config` composes `ModelConfig` into `Config` and calls `validate_model` from `validate`
(turning `ModelConfigError` into its `ConfigError`, message unchanged). The names a config may
choose are the tables of the code that runs them: `models.attention.IMPLEMENTATIONS`,
`models.mask.IMAGE_ATTENTION` and `models.remat.REMAT_POLICIES`; this module does not import the
transformer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

from tfx_jax.models.attention import IMPLEMENTATIONS
from tfx_jax.models.mask import IMAGE_ATTENTION
from tfx_jax.models.remat import REMAT_POLICIES

__all__ = ["DTYPES", "ModelConfig", "ModelConfigError", "validate_model"]

DTYPES = ("float32", "bfloat16", "float16")


class ModelConfigError(ValueError):
    """A `model` section that cannot run. The message names the key, the value and what to do."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The Transfusion transformer (Llama-style blocks) and its image patch in/out layers."""

    vocab_size: int = 32000
    d_model: int = 768
    n_layers: int = 16
    n_heads: int = 12
    n_kv_heads: int = 0  # 0 = same as n_heads (multi-head); fewer = grouped-query attention
    mlp_dim: int = 0  # 0 = Llama rule: 8/3 * d_model rounded up to a multiple of 256
    rope_theta: float = 10_000.0
    qk_norm: bool = False
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    # Image latents (the VAE's output grid) and how they become transformer positions.
    latent_size: int = 32  # h = w of the latent grid
    latent_channels: int = 8  # C of the latent (Transfusion's VAE: 8)
    patch_size: int = 2  # p x p latent pixels per transformer position
    patch_encoder: str = "linear"  # "linear" or "unet" (Transfusion §3.2)
    unet_channels: tuple[int, ...] = (64, 128)  # widths of the U-Net down/up stages
    # Patches of one image attend to each other ("bidirectional", Transfusion §3.2) or only to
    # earlier ones, like text ("causal": the Table 5 ablation; models/mask.py).
    image_attention: str = "bidirectional"
    # Numerics, memory, kernels.
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master weights
    scan_layers: bool = True
    remat_policy: str = "dots_no_batch"  # see tfx_jax.models.remat.REMAT_POLICIES
    attention_impl: str = "xla"  # tfx_jax.models.attention.IMPLEMENTATIONS; "auto": per platform

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.mlp_dim:
            return self.mlp_dim
        return 256 * math.ceil(8 * self.d_model / 3 / 256)

    @property
    def num_patches(self) -> int:
        """N: transformer positions per image."""
        return (self.latent_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        """P: floats per patch vector."""
        return self.patch_size * self.patch_size * self.latent_channels


def validate_model(m: ModelConfig) -> None:
    """Checks the `model` section on its own (cheap: nothing is built or compiled).

    Raises:
      ModelConfigError: naming the key, the value and what to do.
    """

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ModelConfigError(msg)

    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "latent_size", "patch_size"):
        need(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive.")
    need(
        m.d_model % m.n_heads == 0,
        f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}.",
    )
    need(
        m.n_heads % m.kv_heads == 0,
        f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}.",
    )
    need(m.head_dim % 2 == 0, f"model.d_model/n_heads={m.head_dim} must be even for RoPE.")
    need(
        m.latent_size % m.patch_size == 0,
        f"model.patch_size={m.patch_size} does not tile model.latent_size={m.latent_size}: "
        f"the patch grid must divide the latent.",
    )
    need(
        m.patch_encoder in ("linear", "unet"),
        f"model.patch_encoder={m.patch_encoder!r}: use 'linear' or 'unet'.",
    )
    if m.patch_encoder == "unet":
        factor = 2 ** (len(m.unet_channels) - 1)
        need(
            len(m.unet_channels) >= 1 and factor == m.patch_size,
            f"model.unet_channels={m.unet_channels} downsamples by {factor} but "
            f"model.patch_size={m.patch_size}: a U-Net with k stages patches by 2^(k-1).",
        )
    need(
        m.image_attention in IMAGE_ATTENTION,
        f"model.image_attention={m.image_attention!r}: use 'bidirectional' or 'causal'.",
    )
    need(m.dtype in DTYPES, f"model.dtype={m.dtype!r}: use one of {DTYPES}.")
    need(m.param_dtype in DTYPES, f"model.param_dtype={m.param_dtype!r}: use one of {DTYPES}.")
    need(
        m.attention_impl in IMPLEMENTATIONS,
        f"model.attention_impl={m.attention_impl!r}: use one of {sorted(IMPLEMENTATIONS)}.",
    )
    need(
        m.attention_impl != "tokamax" or importlib.util.find_spec("tokamax") is not None,
        "model.attention_impl=tokamax needs the optional tokamax package (pip install tokamax); "
        "use cudnn (GPU) or xla otherwise.",
    )
    need(
        m.remat_policy in REMAT_POLICIES,
        f"model.remat_policy={m.remat_policy!r}: use one of {sorted(REMAT_POLICIES)}.",
    )
