"""The packed batch: what one training row holds and how images are found in it.

A batch is a dict of arrays with a leading batch dim B and sequence length T:

  tokens       int32 [B, T]     text token ids; at image positions the model ignores it and it
                                carries a per-patch flag instead: IMAGE_FIRST_MARK (1) on the
                                patches of an image that precedes its caption (the data pipeline
                                sets it with `SequenceSpec.mark_image_first`; the train step caps
                                those images' noise when `diffusion.noise_limit_image_first`,
                                Transfusion §4.3), 0 otherwise (synthetic batches: always 0)
  segment_ids  int32 [B, T]     packed document id, 1, 2, ...; 0 = padding
  positions    int32 [B, T]     position inside the document (RoPE uses these)
  image_ids    int32 [B, T]     0 for text; k >= 1 for the patches of the k-th image of a document
  patches      float32 [B,T,P]  clean latent patch vectors at image positions, zeros elsewhere

`image_ids > 0` is the modality mask. Each image is a contiguous run of I = num_patches positions
wrapped by BOI ... EOI text tokens, and never split across rows. A (segment, image) pair is unique
in a row, so the model can find image *slots* (at most M per row) without extra metadata: that is
what `image_slots` computes, vectorised and with no data-dependent shapes.

What the model itself reads is one pytree, `ModelInputs`: this layout plus the image slots and
the noisy latents with their timesteps. `ModelInputs.spec(cfg)` / `.dummy(cfg)` give its shapes for
init, eval_shape, lowering and export; the train step, the decoder and export all build it, so the
contract is stated once, here.

Legend: B batch, T length, M image slots per row, I patches per image, P patch dim, h/w/C latent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # what a batch's shapes depend on: the leaf protocol, never tfx_jax.config
    from tfx_jax.data.config import RunConfig

BATCH_KEYS = ("tokens", "segment_ids", "positions", "image_ids", "patches")
# The `tokens` value at the patches of an image that precedes its caption (see the docstring).
# Kept inside `tokens`, which the model ignores at image positions, so the batch keeps five
# fields: the stock packer, the batch shardings and checkpoints need no change.
IMAGE_FIRST_MARK = 1


# ----------------------------------------------------------------------------- the contract


def batch_spec(cfg: RunConfig, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global packed batch (the fields above)."""
    B = batch_size or cfg.data.global_batch_size
    T, P = cfg.data.seq_len, cfg.model.patch_dim
    spec = {k: jax.ShapeDtypeStruct((B, T), jnp.int32) for k in BATCH_KEYS[:4]}
    spec["patches"] = jax.ShapeDtypeStruct((B, T, P), jnp.float32)
    return spec


@flax.struct.dataclass
class ModelInputs:
    """Everything `Transfusion` reads, as one pytree (big_vision/gemma style: one contract).

    Attributes:
      tokens: int32 [B, T] text ids (ignored at image positions).
      segment_ids: int32 [B, T] packed document ids, 0 = padding.
      positions: int32 [B, T] RoPE positions inside each document.
      image_ids: int32 [B, T] what the attention mask sees: k >= 1 on the patches of the k-th
        image of a document (rolling diffusion gives each window row block its own id).
      slots: int32 [B, T] image slot of each position, -1 for text (`image_slots`).
      starts: int32 [B, M] first position of each slot.
      noisy_latents: float32 [B, M, h, w, C] x_t of every slot (anything for empty slots); when
        decoding with the linear patch encoder, h may be a window of patch rows.
      timesteps: int32 [B, M, I] diffusion timestep of every patch.
    """

    tokens: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    image_ids: jax.Array
    slots: jax.Array
    starts: jax.Array
    noisy_latents: jax.Array
    timesteps: jax.Array

    @classmethod
    def spec(
        cls, cfg: RunConfig, batch: int = 1, length: int | None = None, images: int | None = None
    ) -> ModelInputs:
        """Shapes and dtypes (`jax.ShapeDtypeStruct`s) of the inputs for `batch` rows of
        `length` positions (default `data.seq_len`) with `images` slots (default: a row's
        maximum)."""
        m = cfg.model
        T = cfg.data.seq_len if length is None else length
        M = cfg.max_images_per_row if images is None else images
        ints = jax.ShapeDtypeStruct((batch, T), jnp.int32)
        latent = (batch, M, m.latent_size, m.latent_size, m.latent_channels)
        return cls(
            tokens=ints,
            segment_ids=ints,
            positions=ints,
            image_ids=ints,
            slots=ints,
            starts=jax.ShapeDtypeStruct((batch, M), jnp.int32),
            noisy_latents=jax.ShapeDtypeStruct(latent, jnp.float32),
            timesteps=jax.ShapeDtypeStruct((batch, M, m.num_patches), jnp.int32),
        )

    @classmethod
    def dummy(cls, cfg: RunConfig, batch: int = 1, **kw) -> ModelInputs:
        """Zeros of `spec`'s shapes (text everywhere: slots = -1), for init."""
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cls.spec(cfg, batch, **kw))
        return zeros.replace(slots=zeros.slots - 1)

    @classmethod
    def from_layout(
        cls,
        layout_BT: dict[str, jax.Array],
        noisy_BMhwC: jax.Array,
        t_BMI: jax.Array,
        attn_image_ids_BT: jax.Array | None = None,
    ) -> ModelInputs:
        """The inputs for a packed layout (`tokens`, `segment_ids`, `positions`, `image_ids`)
        and the noisy latents of its M image slots; the slots are found with `image_slots`.

        Args:
          attn_image_ids_BT: the image ids the attention mask should see, when they differ from
            the layout's (rolling diffusion's row blocks); slots always follow the layout's.
        """
        seg, img = layout_BT["segment_ids"], layout_BT["image_ids"]
        slot_BT, start_BM, _ = image_slots(seg, img, noisy_BMhwC.shape[1])
        return cls(
            tokens=layout_BT["tokens"],
            segment_ids=seg,
            positions=layout_BT["positions"],
            image_ids=img if attn_image_ids_BT is None else attn_image_ids_BT,
            slots=slot_BT,
            starts=start_BM,
            noisy_latents=noisy_BMhwC,
            timesteps=t_BMI,
        )


# ----------------------------------------------------------------------------- image slots


def image_starts(segment_ids_BT: jax.Array, image_ids_BT: jax.Array) -> jax.Array:
    """True at the first patch of every image block."""
    is_img = image_ids_BT > 0
    prev_img = jnp.pad(image_ids_BT[:, :-1], ((0, 0), (1, 0)))
    prev_seg = jnp.pad(segment_ids_BT[:, :-1], ((0, 0), (1, 0)))
    changed = (image_ids_BT != prev_img) | (segment_ids_BT != prev_seg)
    return is_img & changed


def image_slots(
    segment_ids_BT: jax.Array, image_ids_BT: jax.Array, max_images: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Assigns each image block in a row to a slot 0..M-1, in order of appearance.

    Returns:
      slot_BT: the slot of each image position, -1 for text/padding (and for images past M).
      start_BM: index of the first patch of each slot (0 for empty slots).
      valid_BM: whether the slot holds an image.
    """
    starts_BT = image_starts(segment_ids_BT, image_ids_BT)
    slot_BT = jnp.cumsum(starts_BT.astype(jnp.int32), axis=1) - 1
    slot_BT = jnp.where((image_ids_BT > 0) & (slot_BT < max_images), slot_BT, -1)
    # start_BM[b, m] = the index t where slot m starts; an argmax over a [B, M, T] compare keeps
    # this a pure elementwise+reduce op that the SPMD partitioner splits along B.
    hit_BMT = starts_BT[:, None, :] & (slot_BT[:, None, :] == jnp.arange(max_images)[None, :, None])
    valid_BM = hit_BMT.any(axis=-1)
    start_BM = jnp.argmax(hit_BMT, axis=-1).astype(jnp.int32)
    return slot_BT, start_BM, valid_BM


def gather_image_tokens(x_BTX: jax.Array, start_BM: jax.Array, num_patches: int) -> jax.Array:
    """Reads each slot's I consecutive positions: [B, T, X] -> [B, M, I, X]."""
    B, M = start_BM.shape
    idx_BMI = start_BM[:, :, None] + jnp.arange(num_patches)[None, None, :]
    idx_BMI = jnp.clip(idx_BMI, 0, x_BTX.shape[1] - 1)
    out = jnp.take_along_axis(x_BTX, idx_BMI.reshape(B, M * num_patches, 1), axis=1)
    return out.reshape(B, M, num_patches, x_BTX.shape[-1])


def scatter_image_tokens(
    x_BTX: jax.Array, img_BMIX: jax.Array, slot_BT: jax.Array, start_BM: jax.Array
) -> jax.Array:
    """Writes slot vectors into their sequence positions (a gather seen from the sequence side)."""
    B, M, I, X = img_BMIX.shape
    T = x_BTX.shape[1]
    slot = jnp.maximum(slot_BT, 0)
    offset_BT = jnp.arange(T)[None, :] - jnp.take_along_axis(start_BM, slot, axis=1)
    flat_BT = jnp.clip(slot * I + offset_BT, 0, M * I - 1)
    picked = jnp.take_along_axis(img_BMIX.reshape(B, M * I, X), flat_BT[:, :, None], axis=1)
    return jnp.where((slot_BT >= 0)[:, :, None], picked.astype(x_BTX.dtype), x_BTX)


def image_first(tokens_BT: jax.Array, image_ids_BT: jax.Array, start_BM: jax.Array) -> jax.Array:
    """[B, M] bool: whether each slot holds an image that precedes its caption (the flag on its
    first patch); False for empty slots."""
    flag_BM = jnp.take_along_axis(tokens_BT, start_BM, axis=1) == IMAGE_FIRST_MARK
    return flag_BM & (jnp.take_along_axis(image_ids_BT, start_BM, axis=1) > 0)


def text_target_mask(segment_ids_BT: jax.Array, image_ids_BT: jax.Array) -> jax.Array:
    """Where next-token cross-entropy applies: position t predicts token t+1.

    Only when both t and t+1 are text in the same (non-padding) document: no loss on padding, across
    documents, for predicting image patches, or from the last patch (the EOI after an image block is
    implied by the fixed patch count). The last position has no target.
    """
    seg_next = jnp.pad(segment_ids_BT[:, 1:], ((0, 0), (0, 1)))
    img_next = jnp.pad(image_ids_BT[:, 1:], ((0, 0), (0, 1)), constant_values=1)
    return (
        (segment_ids_BT > 0) & (seg_next == segment_ids_BT) & (image_ids_BT == 0) & (img_next == 0)
    )


def text_before_image(segment_ids_BT: jax.Array, image_ids_BT: jax.Array) -> jax.Array:
    """Text positions with an image later in their document (a caption that precedes its image),
    BOI itself excluded: bool [B, T]. `train.lm_loss_before_images=False` takes them out of the
    LM loss, so the caption-only prior is not learned from them."""
    T = segment_ids_BT.shape[1]
    t_T = jnp.arange(T)
    image_at_BT = jnp.where(image_ids_BT > 0, t_T, -1)
    last_image_BS = jax.vmap(lambda v, s: jax.ops.segment_max(v, s, num_segments=T + 1))(
        image_at_BT, segment_ids_BT
    )
    last_image_BT = jnp.take_along_axis(last_image_BS, segment_ids_BT, axis=1)
    text = (image_ids_BT == 0) & (segment_ids_BT > 0)
    boi = text & jnp.pad(image_ids_BT[:, 1:] > 0, ((0, 0), (0, 1)))
    return text & (t_T < last_image_BT) & ~boi


def patchify(lat_BMhwC: jax.Array, patch_size: int) -> jax.Array:
    """[..., h, w, C] -> [..., (h/p)*(w/p), p*p*C], rows of patches in raster order."""
    *lead, h, w, C = lat_BMhwC.shape
    p = patch_size
    x = lat_BMhwC.reshape(*lead, h // p, p, w // p, p, C)
    x = jnp.moveaxis(x, -4, -3)  # [..., h/p, w/p, p, p, C]
    return x.reshape(*lead, (h // p) * (w // p), p * p * C)


def patchify_np(lat_hwC: np.ndarray, patch_size: int) -> np.ndarray:
    """Host-side `patchify` for the data pipeline: [..., h, w, C] -> [..., I, P] float32."""
    *lead, h, w, c = lat_hwC.shape
    p, n = patch_size, len(lat_hwC.shape) - 3
    x = np.asarray(lat_hwC).reshape(*lead, h // p, p, w // p, p, c)
    x = x.transpose(*range(n), n, n + 2, n + 1, n + 3, n + 4)
    return x.reshape(*lead, (h // p) * (w // p), p * p * c).astype(np.float32)


def unpatchify(
    x_BMIP: jax.Array, patch_size: int, channels: int, grid: tuple[int, int] | None = None
) -> jax.Array:
    """Inverse of `patchify`: a square grid, or `grid` = (rows, cols) of patches (e.g. a window
    of patch rows in rolling diffusion)."""
    *lead, n, _ = x_BMIP.shape
    gh, gw = grid or (int(round(n**0.5)),) * 2
    p = patch_size
    x = x_BMIP.reshape(*lead, gh, gw, p, p, channels)
    x = jnp.moveaxis(x, -3, -4)  # [..., gh, p, gw, p, C]
    return x.reshape(*lead, gh * p, gw * p, channels)
