"""A functional key/value cache for decoding: arrays in, arrays out, no hidden state.

Each row of the batch has its own write index (`index_B`), so prompts of different lengths and
rows that are busy with different things (one writes a text token while another runs an image
block) share one batch without wasting cache slots. A chunk of T new positions of row b is written
at slots [index_B[b], index_B[b] + T); slots that were never written, or were written as padding,
have segment id 0 and are masked out by the Transfusion rule in `models/mask.py`, which is applied
unchanged with absolute indices (query i at index_B + i, key j at slot j).

Writing is a per-row select (`write_rows`), not a scatter: every op is elementwise or a gather
along the length axis, so the SPMD partitioner splits it along the (sharded) batch axis.

Legend: L layers, B batch, S cache slots, T chunk length, K kv heads, H head dim.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from tfx_jax.models.mask import attention_mask

# Logical axis names of the cached K/V (the mesh rules in `MeshConfig.rules` map them).
KV_AXES = ("layers", "act_batch", "act_length", "act_kv_heads", None)
META_AXES = ("act_batch", "act_length")


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for S slots per row, with the ids the mask needs.

    Attributes:
      k, v: [L, B, S, K, H] rotated keys and values (compute dtype).
      segment_ids: [B, S] document id of each slot, 0 = empty or padding.
      image_ids: [B, S] attention image id of each slot (0 = text), as passed to the model.
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    image_ids: jax.Array

    @property
    def length(self) -> int:
        return self.segment_ids.shape[1]


def init_cache(
    n_layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype
) -> KVCache:
    """An empty cache: every slot has segment id 0."""
    kv = jnp.zeros((n_layers, batch, length, kv_heads, head_dim), dtype)
    ids = jnp.zeros((batch, length), jnp.int32)
    return KVCache(k=kv, v=kv, segment_ids=ids, image_ids=ids)


def write_rows(cache_BS: jax.Array, new_BT: jax.Array, index_B: jax.Array) -> jax.Array:
    """Returns `cache_BS` with row b's slots [index_B[b], index_B[b] + T) set to `new_BT[b]`.

    Args:
      cache_BS: [B, S, ...] the cached array.
      new_BT: [B, T, ...] the chunk (same trailing dims).
      index_B: [B] int32 first slot of each row's chunk; index + T must be <= S.
    """
    S, T = cache_BS.shape[1], new_BT.shape[1]
    offset_BS = jnp.arange(S)[None, :] - index_B[:, None]
    inside_BS = (offset_BS >= 0) & (offset_BS < T)
    idx_BS = jnp.clip(offset_BS, 0, T - 1)
    idx = idx_BS.reshape(idx_BS.shape + (1,) * (new_BT.ndim - 2))
    picked = jnp.take_along_axis(new_BT, idx, axis=1).astype(cache_BS.dtype)
    inside = inside_BS.reshape(inside_BS.shape + (1,) * (new_BT.ndim - 2))
    return jnp.where(inside, picked, cache_BS)


def decode_mask(
    cache: KVCache,
    segment_ids_BT: jax.Array,
    image_ids_BT: jax.Array,
    index_B: jax.Array,
    image_attention: str = "bidirectional",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The mask of a chunk's queries over the cache after the chunk is written (with causal
    image attention, an image block decoded as one chunk is causal inside too).

    Returns:
      (mask [B, 1, T, S], the cache's new segment ids [B, S], its new image ids [B, S]).
    """
    T = segment_ids_BT.shape[1]
    seg_BS = write_rows(cache.segment_ids, segment_ids_BT, index_B)
    img_BS = write_rows(cache.image_ids, image_ids_BT, index_B)
    q_index_BT = index_B[:, None] + jnp.arange(T)[None, :]
    mask_BTS = attention_mask(
        segment_ids_BT,
        seg_BS,
        image_ids_BT,
        img_BS,
        q_index=q_index_BT,
        kv_index=None,
        image_attention=image_attention,
    )
    return mask_BTS[:, None], seg_BS, img_BS
