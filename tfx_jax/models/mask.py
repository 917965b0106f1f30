"""The Transfusion attention mask (Zhou et al. 2024, §3.2 and Fig. 4).

Query i may attend to key j iff they are in the same packed document (segment id) and either
j <= i (causal, across text and images) or i and j are patches of the same image (bidirectional
inside an image block). Padding queries attend only to themselves so that no row of the softmax is
empty (an all -inf row gives NaN in every kernel); padding never reaches a loss.

`image_attention="causal"` (`model.image_attention`, the ablation of Transfusion Table 5: linear
patches with causal attention inside images, FID 61.3 vs 20.3) drops the same-image term: patches
attend causally like text and the mask is plain per-document causal. Every kernel gets the rule
from here (the dense mask, `key_ranges`, the cached decoding mask), so none has a second copy.

Built from per-token ids, never from the sequence content, so a kernel can use the same rule in
another form: for each query the allowed keys are one contiguous range [k_start, k_end)
(document start .. i+1 for text, document start .. image end for patches, or .. i+1 for patches
too with causal image attention) — see `key_ranges`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMAGE_ATTENTION = ("bidirectional", "causal")  # how patches of one image attend to each other


def _bidirectional(image_attention: str) -> bool:
    if image_attention not in IMAGE_ATTENTION:
        raise ValueError(f"image_attention={image_attention!r}: use one of {IMAGE_ATTENTION}")
    return image_attention == "bidirectional"


def attention_mask(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_image_ids: jax.Array,
    kv_image_ids: jax.Array,
    q_index: jax.Array | None = None,
    kv_index: jax.Array | None = None,
    image_attention: str = "bidirectional",
) -> jax.Array:
    """Boolean mask [B, Tq, Tk]: True where query i may attend to key j.

    Args:
      q_segment_ids, kv_segment_ids: [B, Tq] / [B, Tk] document ids, 0 = padding.
      q_image_ids, kv_image_ids: [B, Tq] / [B, Tk] image-block ids within the document, 0 = text.
      q_index, kv_index: [B, Tq] / [B, Tk] (or [Tq] / [Tk]) absolute indices in the row that order
        causality; default arange (training). Decoding with a KV cache passes offsets here.
      image_attention: "bidirectional" (patches of one image see each other) or "causal"
        (they attend causally, like text).
    """
    Tq, Tk = q_segment_ids.shape[-1], kv_segment_ids.shape[-1]
    q_index = jnp.arange(Tq) if q_index is None else q_index
    kv_index = jnp.arange(Tk) if kv_index is None else kv_index
    q_index = jnp.broadcast_to(q_index, q_segment_ids.shape)
    kv_index = jnp.broadcast_to(kv_index, kv_segment_ids.shape)

    q_seg, kv_seg = q_segment_ids[:, :, None], kv_segment_ids[:, None, :]
    q_img, kv_img = q_image_ids[:, :, None], kv_image_ids[:, None, :]
    q_idx, kv_idx = q_index[:, :, None], kv_index[:, None, :]

    same_doc = (q_seg == kv_seg) & (q_seg > 0)
    causal = kv_idx <= q_idx
    pad_self = (q_seg == 0) & (q_idx == kv_idx)
    if not _bidirectional(image_attention):
        return (same_doc & causal) | pad_self
    same_image = (q_img == kv_img) & (q_img > 0)
    return (same_doc & (causal | same_image)) | pad_self


def key_ranges(
    segment_ids: jax.Array, image_ids: jax.Array, image_attention: str = "bidirectional"
) -> tuple[jax.Array, jax.Array]:
    """The same mask as per-query key ranges [k_start, k_end) for block-sparse kernels.

    Valid for training layouts (documents and images are contiguous runs in the row). With
    `image_attention="causal"` a patch's k_end is i + 1, as for text.
    Returns two int32 arrays [B, T].
    """
    B, T = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg_start = jnp.pad(
        segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=True
    )
    doc_start = jax.lax.cummax(jnp.where(seg_start, idx, 0), axis=1)
    # Image end: the index after the last patch of this block (scan from the right).
    img = image_ids
    img_next_diff = jnp.pad(
        (img[:, :-1] != img[:, 1:]) | (segment_ids[:, :-1] != segment_ids[:, 1:]),
        ((0, 0), (0, 1)),
        constant_values=True,
    )
    block_end = jax.lax.cummin(jnp.where(img_next_diff, idx + 1, T), axis=1, reverse=True)
    k_end = jnp.where(img > 0, block_end, idx + 1) if _bidirectional(image_attention) else idx + 1
    k_start = jnp.where(segment_ids > 0, doc_start, idx)
    return k_start, k_end
