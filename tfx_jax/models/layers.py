"""Llama-style transformer layers: RMSNorm, RoPE, attention, SwiGLU, the pre-norm block.

Every parameter is created with logical axis names and every large activation is constrained by
logical names; `MeshConfig.rules` maps them to mesh axes.

Legend: B batch, T length, D d_model, N query heads, K kv heads, H head dim, F mlp hidden.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfx_jax.models import attention
from tfx_jax.models.config import ModelConfig
from tfx_jax.models.kv_cache import KV_AXES, write_rows

Dtype = Any


def _init(names: tuple[str | None, ...], in_axis=-2, out_axis=-1):
    return nn.with_logical_partitioning(
        nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
        ),
        names,
    )


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (Su et al. 2021) on the packed per-document positions.

    Rotates pairs (x[..., :H/2], x[..., H/2:]) by angle position * theta^(-2i/H).
    """
    H = x_BTNH.shape[-1]
    freq = theta ** (-jnp.arange(0, H // 2, dtype=jnp.float32) * 2 / H)
    angle_BT1F = positions_BT[:, :, None, None].astype(jnp.float32) * freq
    sin, cos = jnp.sin(angle_BT1F), jnp.cos(angle_BT1F)
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention with RoPE, optional QK-norm, pluggable kernel."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        mask_aux: Any,
        kv: tuple[jax.Array, jax.Array] | None = None,
        index_B: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Self-attention over the chunk, or over the chunk written into a KV cache.

        Args:
          x_BTD, positions_BT: the chunk's activations and RoPE positions.
          mask_aux: what the kernel's `prepare` returned (training), or the dense decode mask
            [B, 1, T, S] from `kv_cache.decode_mask` (decoding).
          kv: this layer's cached (k_BSKH, v_BSKH); None for the training forward pass.
          index_B: [B] slot where each row's chunk is written (with `kv`).

        Returns:
          (output [B, T, D], the updated (k_BSKH, v_BSKH) or None without a cache).
        """
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        N, K, H = cfg.n_heads, cfg.kv_heads, cfg.head_dim

        def proj(name, heads, head_axis):
            # A plain param + einsum (not nn.DenseGeneral, whose flat-then-reshape init breaks
            # 3-D logical axis names).
            kernel_DXH = self.param(
                name,
                _init(("embed", head_axis, "head_dim"), in_axis=0, out_axis=(1, 2)),
                (cfg.d_model, heads, H),
                pdtype,
            )
            return jnp.einsum("btd,dxh->btxh", x_BTD.astype(dtype), kernel_DXH.astype(dtype))

        q_BTNH = proj("query", N, "heads")
        k_BTKH = proj("key", K, "kv_heads")
        v_BTKH = proj("value", K, "kv_heads")
        if cfg.qk_norm:  # Dehghani et al. 2023; Chameleon uses it for stable mixed-modal training.
            q_BTNH = RMSNorm(cfg.norm_eps, dtype, pdtype, "head_dim", name="query_norm")(q_BTNH)
            k_BTKH = RMSNorm(cfg.norm_eps, dtype, pdtype, "head_dim", name="key_norm")(k_BTKH)
        q_BTNH = rope(q_BTNH, positions_BT, cfg.rope_theta)
        k_BTKH = rope(k_BTKH, positions_BT, cfg.rope_theta)
        q_BTNH = nn.with_logical_constraint(q_BTNH, ("act_batch", "act_length", "act_heads", None))
        k_BTKH = nn.with_logical_constraint(
            k_BTKH, ("act_batch", "act_length", "act_kv_heads", None)
        )
        v_BTKH = nn.with_logical_constraint(
            v_BTKH, ("act_batch", "act_length", "act_kv_heads", None)
        )

        if kv is None:
            o_BTNH = attention.get(cfg.attention_impl).apply(q_BTNH, k_BTKH, v_BTKH, mask_aux)
        else:
            # Decoding: write the chunk's K/V at each row's index, attend over all S slots.
            k_BSKH = write_rows(kv[0], k_BTKH, index_B)
            v_BSKH = write_rows(kv[1], v_BTKH, index_B)
            k_BSKH = nn.with_logical_constraint(k_BSKH, KV_AXES[1:])
            v_BSKH = nn.with_logical_constraint(v_BSKH, KV_AXES[1:])
            impl = attention.decode_impl(cfg.attention_impl)
            o_BTNH = impl.apply(q_BTNH, k_BSKH.astype(dtype), v_BSKH.astype(dtype), mask_aux)
            kv = (k_BSKH, v_BSKH)
        o_BTNH = nn.with_logical_constraint(o_BTNH, ("act_batch", "act_length", "act_heads", None))
        kernel_NHD = self.param(
            "out",
            _init(("heads", "head_dim", "embed"), in_axis=(0, 1), out_axis=2),
            (N, H, cfg.d_model),
            pdtype,
        )
        return jnp.einsum("btnh,nhd->btd", o_BTNH, kernel_NHD.astype(dtype)), kv


class SwiGLU(nn.Module):
    """Gated MLP of Llama (Shazeer 2020): W2(silu(W1 x) * W3 x)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        def dense(name, features, names):
            return nn.Dense(
                features,
                use_bias=False,
                dtype=dtype,
                param_dtype=pdtype,
                kernel_init=_init(names),
                name=name,
            )

        gate_BTF = dense("gate", cfg.hidden_dim, ("embed", "mlp"))(x_BTD)
        up_BTF = dense("up", cfg.hidden_dim, ("embed", "mlp"))(x_BTD)
        h_BTF = nn.silu(gate_BTF) * up_BTF
        h_BTF = nn.with_logical_constraint(h_BTF, ("act_batch", "act_length", "act_mlp"))
        return dense("down", cfg.d_model, ("mlp", "embed"))(h_BTF)


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(Norm(x)); x + MLP(Norm(x)).

    Returns `(x, None)` in training and `(x, updated layer cache)` when given a layer cache, so it
    can be stacked with `nn.scan` (the cache is scanned over the layer axis).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        mask_aux: Any,
        kv: tuple[jax.Array, jax.Array] | None = None,
        index_B: jax.Array | None = None,
    ):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_length", "act_embed"))
        h = RMSNorm(cfg.norm_eps, dtype, pdtype, name="attn_norm")(x_BTD)
        attn_BTD, kv = Attention(cfg, name="attn")(h, positions_BT, mask_aux, kv, index_B)
        x_BTD = x_BTD + attn_BTD
        h = RMSNorm(cfg.norm_eps, dtype, pdtype, name="mlp_norm")(x_BTD)
        x_BTD = x_BTD + SwiGLU(cfg, name="mlp")(h)
        x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_length", "act_embed"))
        return x_BTD, kv
