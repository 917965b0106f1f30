"""The Transfusion model: one decoder-only transformer over text tokens and image patches.

    tokens ──embed──────────────┐
                                ├─ sequence [B,T,D] ─ N x Block ─ RMSNorm ─┬─ LM head ─ logits
    noisy latents ─PatchEncoder─┘  (image slots written in place)          └─ PatchDecoder ─ ε̂
                 (+ timestep embedding)

Text positions carry token embeddings; image positions carry embedded noisy latent patches plus a
timestep embedding (Transfusion §3.2). The mask is causal across the sequence and bidirectional
inside each image (§3.2, Fig. 4). The same backbone produces next-token logits for text and an
ε-prediction for every image patch.

Legend: B batch, T length, D d_model, V vocab, M image slots per row, I patches per image,
h/w/C latent grid.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfx_jax.config import ModelConfig
from tfx_jax.layout import gather_image_tokens, scatter_image_tokens
from tfx_jax.models import attention
from tfx_jax.models.layers import Block, RMSNorm
from tfx_jax.models.patch import PatchDecoder, PatchEncoder, TimestepEmbedding

# Named rematerialisation policies: what the backward pass may keep instead of recomputing.
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    # keep weight matmuls (the usual best trade-off for transformers)
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transfusion(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BT: jax.Array,
        segment_ids_BT: jax.Array,
        positions_BT: jax.Array,
        image_ids_BT: jax.Array,
        slot_BT: jax.Array,
        start_BM: jax.Array,
        noisy_BMhwC: jax.Array,
        t_BMI: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """Runs the model on a packed batch (see `tfx_jax.layout` for the format).

        Args:
          tokens_BT, segment_ids_BT, positions_BT, image_ids_BT: the packed layout.
          slot_BT, start_BM: image slots from `layout.image_slots`.
          noisy_BMhwC: noised latents x_t for every slot (anything for empty slots).
          t_BMI: integer diffusion timestep of every patch.

        Returns:
          logits_BTV (float32) and the predicted noise ε̂ as [B, M, h, w, C] (float32).
        """
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

        temb_BMID = TimestepEmbedding(cfg.d_model, dtype, pdtype, name="time_embed")(t_BMI)
        img_BMID, skips = PatchEncoder(cfg, name="patch_in")(noisy_BMhwC, temb_BMID)
        x_BTD = scatter_image_tokens(x_BTD, img_BMID, slot_BT, start_BM)
        x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_length", "act_embed"))

        mask_aux = attention.get(cfg.attention_impl).prepare(segment_ids_BT, image_ids_BT)
        x_BTD = self._layers(x_BTD, positions_BT, mask_aux)
        x_BTD = RMSNorm(cfg.norm_eps, dtype, pdtype, name="final_norm")(x_BTD)

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

        h_BMID = gather_image_tokens(x_BTD, start_BM, cfg.num_patches)
        eps_BMhwC = PatchDecoder(cfg, name="patch_out")(h_BMID, temb_BMID, skips)
        return logits_BTV.astype(jnp.float32), eps_BMhwC.astype(jnp.float32)

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
