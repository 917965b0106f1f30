"""The Grain input pipeline: examples → interleaved token/patch sequences → packed batches.

    random-access source (examples zipped with their precomputed latents)
      → per-host shard [process_index::process_count]
      → seeded global shuffle, repeat
      → to_sequence: tokenize text, insert images as BOI, I patch slots, EOI (caption before the
        image with probability 0.8, Transfusion §4.1; dropped with probability p_uncond for
        classifier-free guidance); drop or truncate over-long examples
      → first-fit packing (Grain's FirstFitPackIterDataset) into rows of seq_len with segment ids
        and positions; an example is never split, so neither is an image
      → batches of this host's rows in the `tfx_jax.layout` format
      → (optional) multiprocess prefetch

Deterministic from the seed; the iterator's `get_state()`/`set_state()` make it resumable (the
checkpoint stores that state). Hosts read disjoint slices of the source.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from tfx_jax.data.tokenizer import BOI_ID, BOS_ID, EOI_ID, EOS_ID
from tfx_jax.layout import IMAGE_FIRST_MARK, patchify_np

log = logging.getLogger(__name__)
IMAGE_PLACEHOLDER = "<image>"


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
    """How an example becomes one token/patch sequence.

    Attributes:
      seq_len: packed row length T.
      patch_size: p; a latent [h, w, C] becomes (h/p)(w/p) patches of p*p*C floats.
      latent_channels: C.
      caption_first_prob: probability that a caption precedes its image (paper: 0.8).
      overlong: "drop" an example longer than seq_len, or "truncate" it at a text boundary.
      on_error: "skip" a record that fails to decode (counted) or "raise".
      caption_drop_prob: p_uncond, probability that a caption example loses its caption and
        becomes BOS, image block, EOS, so classifier-free guidance has an unconditional model
        to subtract (Ho & Salimans 2022, §3.2).
      mark_image_first: set `tokens` to `layout.IMAGE_FIRST_MARK` on the patches of an image
        that precedes its caption (read by the train step's noise limit, Transfusion §4.3).
    """

    seq_len: int
    patch_size: int
    latent_channels: int
    caption_first_prob: float = 0.8
    overlong: str = "drop"
    on_error: str = "skip"
    caption_drop_prob: float = 0.0
    mark_image_first: bool = False


@dataclasses.dataclass
class Counters:
    """What the pipeline threw away, counted in this process (workers keep their own)."""

    overlong_dropped: int = 0
    truncated: int = 0
    decode_errors: int = 0


class ZipSource:
    """Record i = the example i of `examples` with `latents[i]` ([n_images, h, w, C]) added."""

    def __init__(self, examples: Sequence[dict], latents: Sequence[np.ndarray]):
        if len(examples) != len(latents):
            raise ValueError(
                f"{len(examples)} examples but {len(latents)} latent records: the latents were "
                "computed for another version of the data; run `python -m tfx_jax data latents`."
            )
        self._examples, self._latents = examples, latents

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict:
        return {**self._examples[index], "latents": self._latents[index]}


def _pieces(example: dict, rng: np.random.Generator, spec: SequenceSpec) -> list[Any]:
    """The document as an ordered list of text strings and image indices."""
    kind, text, n_images = example["kind"], example["text"], len(example["latents"])
    if kind == "caption":
        if n_images != 1:
            raise ValueError(f"a caption example has {n_images} images, expected 1")
        # Draw only when dropping is on, so p_uncond = 0 leaves every other draw unchanged.
        if spec.caption_drop_prob > 0 and rng.random() < spec.caption_drop_prob:
            return [0]
        return [text, 0] if rng.random() < spec.caption_first_prob else [0, text]
    parts = text.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != n_images:
        raise ValueError(
            f"text has {len(parts) - 1} {IMAGE_PLACEHOLDER} markers, {n_images} images"
        )
    out: list[Any] = []
    for k, part in enumerate(parts):
        if part.strip():
            out.append(part.strip())
        if k < n_images:
            out.append(k)
    return out


def to_sequence(
    example: dict,
    rng: np.random.Generator,
    encode: Callable[[str], list[int]],
    spec: SequenceSpec,
    counters: Counters | None = None,
) -> dict[str, np.ndarray] | None:
    """One example -> {"tokens", "image_ids" [L], "patches" [L, P]}, or None to drop it.

    Layout: BOS, then text pieces and image blocks (BOI, I patch slots, EOI) in document order,
    then EOS. Image k (1-based) of the document marks its patches with image id k.
    """
    counters = counters or Counters()
    latents = example["latents"]
    tokens: list[np.ndarray] = [np.array([BOS_ID], np.int32)]
    image_ids: list[np.ndarray] = [np.zeros(1, np.int32)]
    pieces = _pieces(example, rng, spec)
    for i, piece in enumerate(pieces):
        if isinstance(piece, str):
            ids = np.asarray(encode(piece), np.int32)
            tokens.append(ids)
            image_ids.append(np.zeros(len(ids), np.int32))
        else:
            n = (latents[piece].shape[0] // spec.patch_size) * (
                latents[piece].shape[1] // spec.patch_size
            )
            # An image that precedes its caption: a caption example whose text comes next.
            nxt = pieces[i + 1] if i + 1 < len(pieces) else None
            first = example["kind"] == "caption" and isinstance(nxt, str)
            mark = IMAGE_FIRST_MARK if spec.mark_image_first and first else 0
            tokens.append(np.array([BOI_ID] + [mark] * n + [EOI_ID], np.int32))
            image_ids.append(np.array([0] + [piece + 1] * n + [0], np.int32))
    tokens.append(np.array([EOS_ID], np.int32))
    image_ids.append(np.zeros(1, np.int32))
    tok, img = np.concatenate(tokens), np.concatenate(image_ids)
    if len(tok) > spec.seq_len:
        if spec.overlong == "drop":
            counters.overlong_dropped += 1
            return None
        # Keep tok[:cut] for the largest cut that ends on text and not on a BOI, so no image
        # block is split and none is opened without its patches.
        head_tok, head_img = tok[: spec.seq_len], img[: spec.seq_len]
        cuts = np.flatnonzero((head_img == 0) & (head_tok != BOI_ID)) + 1
        tok, img = tok[: cuts.max()], img[: cuts.max()]
        counters.truncated += 1
    patches = np.zeros((len(tok), spec.patch_size**2 * spec.latent_channels), np.float32)
    for k in range(len(latents)):
        idx = np.flatnonzero(img == k + 1)
        if len(idx):
            patches[idx] = patchify_np(np.asarray(latents[k], np.float32), spec.patch_size)
    return {"tokens": tok, "image_ids": img, "patches": patches}


class _ToSequence(grain.transforms.RandomMap):
    def __init__(self, encode, spec: SequenceSpec, counters: Counters):
        self._encode, self._spec, self._counters = encode, spec, counters

    def random_map(self, element, rng: np.random.Generator):
        try:
            return to_sequence(element, rng, self._encode, self._spec, self._counters)
        except Exception as e:  # a record that cannot be decoded or does not match its images
            if self._spec.on_error == "raise":
                raise
            self._counters.decode_errors += 1
            log.warning("skipping a bad record (%s); %d so far", e, self._counters.decode_errors)
            return None


class _SafeSource:
    """Reads records, turning a failure into None (skip) or an error naming the record."""

    def __init__(self, source: Sequence[dict], on_error: str, counters: Counters):
        self._source, self._on_error, self._counters = source, on_error, counters

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        try:
            return self._source[index]
        except Exception as e:
            if self._on_error == "raise":
                raise ValueError(
                    f"record {index} of {self._source!r} cannot be read: {e}. Set "
                    "data.on_error=skip to skip such records (they are counted)."
                ) from e
            self._counters.decode_errors += 1
            log.warning("skipping unreadable record %d (%s)", index, e)
            return None


def _finalize(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "tokens": row["tokens"],
        "segment_ids": row["tokens_segment_ids"].astype(np.int32),
        "positions": row["tokens_positions"].astype(np.int32),
        "image_ids": row["image_ids"],
        "patches": row["patches"],
    }


def packed_dataset(
    source: Sequence[dict],
    encode: Callable[[str], list[int]],
    spec: SequenceSpec,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_packing_bins: int = 64,
    worker_count: int = 0,
    counters: Counters | None = None,
) -> grain.IterDataset:
    """The packed, batched dataset of this host.

    Args:
      source: random-access records with "kind", "text" and "latents" (see `ZipSource`).
      encode: text -> token ids (e.g. `Tokenizer.encode`).
      spec: sequence layout options.
      batch_size: rows per batch on this host (global batch / process count).
      seed: shuffling, caption order and bin shuffling all derive from it.
      num_epochs: None repeats forever.
      process_index, process_count: this host's shard of the source.
      num_packing_bins: first-fit bins (more: better packing, more memory).
      worker_count: >0 adds Grain multiprocess prefetch with that many workers.
      counters: receives what was dropped (in this process).

    Returns:
      A Grain IterDataset; `iter()` gives a checkpointable iterator of layout-format batches.
    """
    counters = counters if counters is not None else Counters()
    ds = grain.MapDataset.source(_SafeSource(source, spec.on_error, counters))
    ds = ds[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.random_map(_ToSequence(encode, spec, counters), seed=seed + 1)
    it = ds.to_iter_dataset()
    T = spec.seq_len
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={"tokens": T, "image_ids": T, "patches": T},
        num_packing_bins=num_packing_bins,
        seed=seed + 2,
        shuffle_bins=shuffle,
    )
    it = it.map(_finalize).batch(batch_size, drop_remainder=True)
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it
