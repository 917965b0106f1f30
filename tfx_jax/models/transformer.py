"""The Transfusion model: one decoder-only transformer over text tokens and image patches.

    tokens ──embed──────────────┐
                                ├─ sequence [B,T,D] ─ N x Block ─ RMSNorm ─┬─ LM head ─ logits
    noisy latents ─PatchEncoder─┘  (image slots written in place)          └─ PatchDecoder ─ ε̂
                 (+ timestep embedding)

Text positions carry token embeddings; image positions carry embedded noisy latent patches plus a
timestep embedding (Transfusion §3.2). The mask is causal across the sequence and bidirectional
inside each image (§3.2, Fig. 4), or causal inside images too with `model.image_attention=causal`
(the Table 5 ablation; a U-Net patch encoder still mixes an image's patches in its convolutions).
The same backbone produces next-token logits for text and an ε-prediction for every image patch.

Decoding runs the same module on a chunk of new positions with a KV cache (`models/kv_cache.py`):
the chunk's keys and values are written at each row's cache index and its queries attend to every
cached slot under the same mask rule; the layer scan then also scans the cache over the layer
axis (`tfx_jax.generate.decode` drives it).

Legend: B batch, T length, D d_model, V vocab, M image slots per row, I patches per image,
h/w/C latent grid.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from tfx_jax.layout import ModelInputs, gather_image_tokens, scatter_image_tokens
from tfx_jax.models import attention
from tfx_jax.models.config import ModelConfig
from tfx_jax.models.kv_cache import KVCache, decode_mask
from tfx_jax.models.layers import Block, RMSNorm
from tfx_jax.models.patch import PatchDecoder, PatchEncoder, TimestepEmbedding
from tfx_jax.models.remat import REMAT_POLICIES


@flax.struct.dataclass
class ModelOutput:
    """What one forward pass gives (gemma's `Output` is the model for this).

    Attributes:
      logits: float32 [B, T, V] next-token logits; None when called with `with_logits=False`.
      eps: float32 [B, M, h, w, C] predicted noise ε̂ of every image slot.
      cache: the updated KV cache when decoding, else None.
    """

    logits: jax.Array | None
    eps: jax.Array
    cache: KVCache | None = None


class Transfusion(nn.Module):
    """The model. `Transfusion(cfg.model).apply({"params": p}, ModelInputs(...))` -> ModelOutput."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        inputs: ModelInputs,
        cache: KVCache | None = None,
        index_B: jax.Array | None = None,
        with_logits: bool = True,
    ) -> ModelOutput:
        """Runs the model on a packed batch, or on a chunk of new positions written into a KV
        cache (decoding, see `tfx_jax.generate.decode`).

        Args:
          inputs: the packed layout, image slots, noisy latents and timesteps (`ModelInputs`;
            of the chunk when decoding). M may be 0 (a text-only chunk).
          cache: None for the training forward pass; else the KV cache the chunk is written into
            (queries attend to every cached slot under the Transfusion mask).
          index_B: [B] first cache slot of each row's chunk (with `cache`).
          with_logits: False skips the LM head (diffusion steps need only ε̂).

        Returns:
          `ModelOutput`: logits (float32 [B, T, V], None without `with_logits`), ε̂ (float32
          [B, M, h, w, C]) and, with a cache, the updated cache.
        """
        tokens_BT, segment_ids_BT = inputs.tokens, inputs.segment_ids
        positions_BT, image_ids_BT = inputs.positions, inputs.image_ids
        slot_BT, start_BM = inputs.slots, inputs.starts
        noisy_BMhwC, t_BMI = inputs.noisy_latents, inputs.timesteps
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=dtype,
            param_dtype=pdtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            name="embed",
        )
        x_BTD = embed(tokens_BT)

        has_images = noisy_BMhwC.shape[1] > 0  # static: text-only decode chunks skip patches
        if has_images:
            temb_BMID = TimestepEmbedding(cfg.d_model, dtype, pdtype, name="time_embed")(t_BMI)
            img_BMID, skips = PatchEncoder(cfg, name="patch_in")(noisy_BMhwC, temb_BMID)
            x_BTD = scatter_image_tokens(x_BTD, img_BMID, slot_BT, start_BM)
        x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_length", "act_embed"))

        if cache is None:
            mask_aux = attention.get(cfg.attention_impl).prepare(
                segment_ids_BT, image_ids_BT, image_attention=cfg.image_attention
            )
            x_BTD = self._layers(x_BTD, positions_BT, mask_aux)
        else:
            mask_B1TS, seg_BS, img_BS = decode_mask(
                cache, segment_ids_BT, image_ids_BT, index_B, cfg.image_attention
            )
            x_BTD, (k, v) = self._cached_layers(
                x_BTD, positions_BT, mask_B1TS, (cache.k, cache.v), index_B
            )
            cache = KVCache(k=k, v=v, segment_ids=seg_BS, image_ids=img_BS)
        x_BTD = RMSNorm(cfg.norm_eps, dtype, pdtype, name="final_norm")(x_BTD)

        logits_BTV = self._lm_head(embed, x_BTD) if with_logits else None
        if has_images:
            h_BMID = gather_image_tokens(x_BTD, start_BM, t_BMI.shape[-1])
            p = cfg.patch_size
            grid = (noisy_BMhwC.shape[2] // p, noisy_BMhwC.shape[3] // p)
            eps_BMhwC = PatchDecoder(cfg, name="patch_out")(h_BMID, temb_BMID, skips, grid)
            eps_BMhwC = eps_BMhwC.astype(jnp.float32)
        else:
            eps_BMhwC = jnp.zeros(noisy_BMhwC.shape, jnp.float32)
        return ModelOutput(logits=logits_BTV, eps=eps_BMhwC, cache=cache)

    def _lm_head(self, embed: nn.Embed, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if cfg.tie_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            logits_BTV = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=pdtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                    ("embed", "vocab"),
                ),
                name="lm_head",
            )(x_BTD)
        logits_BTV = nn.with_logical_constraint(
            logits_BTV, ("act_batch", "act_length", "act_vocab")
        )
        return logits_BTV.astype(jnp.float32)

    def _layers(self, x_BTD, positions_BT, mask_aux):
        cfg = self.cfg
        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(
                Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
            )
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BTD, _ = stack(cfg, name="layers")(x_BTD, positions_BT, mask_aux)
            return x_BTD
        for i in range(cfg.n_layers):
            x_BTD, _ = block(cfg, name=f"layer_{i}")(x_BTD, positions_BT, mask_aux)
        return x_BTD

    def _cached_layers(self, x_BTD, positions_BT, mask_B1TS, kv, index_B):
        """The layer stack over a cache chunk; the per-layer caches are scanned over axis 0.

        No remat (nothing is differentiated); parameter names match `_layers` (lifted transforms
        keep scope names), so one set of parameters serves both.
        """
        cfg = self.cfg
        if cfg.scan_layers:
            stack = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            return stack(cfg, name="layers")(x_BTD, positions_BT, mask_B1TS, kv, index_B)
        ks, vs = [], []
        for i in range(cfg.n_layers):
            layer_kv = (kv[0][i], kv[1][i])
            x_BTD, (k, v) = Block(cfg, name=f"layer_{i}")(
                x_BTD, positions_BT, mask_B1TS, layer_kv, index_B
            )
            ks.append(k)
            vs.append(v)
        return x_BTD, (jnp.stack(ks), jnp.stack(vs))
