"""The Grain input pipeline: encoded examples → interleaved token/patch sequences → batches.

    random-access source of encoded examples (token ids + VAE latents, `data/encoded.py`)
      → per-host shard [process_index::process_count]
      → seeded global shuffle, repeat
      → to_sequence: insert images as BOI, I patch slots, EOI between the text pieces (caption
        before the image with probability 0.8, Transfusion §4.1; dropped with probability
        p_uncond for classifier-free guidance); drop or truncate over-long examples
      → first-fit packing (Grain's FirstFitPackIterDataset) into rows of seq_len with segment ids
        and positions; an example is never split, so neither is an image
      → batches of this host's rows in the `tfx_jax.layout` format
      → (optional) multiprocess prefetch

Tokenizing and VAE encoding happen once, before training (`python -m tfx_jax data encode`), so
the hot path is read → arrange → pack. Deterministic from the seed; the iterator's
`get_state()`/`set_state()` make it resumable (the checkpoint stores that state). Hosts read
disjoint slices of the source.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import grain
import numpy as np
from absl import flags

from tfx_jax.data.encoded import CAPTION, Record
from tfx_jax.data.tokenizer import BOI_ID, BOS_ID, EOI_ID, EOS_ID
from tfx_jax.layout import IMAGE_FIRST_MARK, patchify_np

log = logging.getLogger(__name__)


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


def to_sequence(
    record: Record,
    rng: np.random.Generator,
    spec: SequenceSpec,
    counters: Counters | None = None,
) -> dict[str, np.ndarray] | None:
    """One encoded example -> {"tokens", "image_ids" [L], "patches" [L, P]}, or None to drop it.

    Layout: BOS, then text pieces and image blocks (BOI, I patch slots, EOI) in document order,
    then EOS. Image k (1-based) of the document marks its patches with image id k. A caption
    example's order (caption first with probability `caption_first_prob`) and its caption
    dropout are drawn here, per epoch.
    """
    pieces = record.pieces
    if record.kind == CAPTION and len(pieces) == 2:
        text = pieces[0]
        # Draw only when dropping is on, so p_uncond = 0 leaves every other draw unchanged.
        if spec.caption_drop_prob > 0 and rng.random() < spec.caption_drop_prob:
            pieces = [0]
        elif rng.random() >= spec.caption_first_prob:
            pieces = [0, text]
    latents = record.latents
    n_patch = (latents.shape[1] // spec.patch_size) * (latents.shape[2] // spec.patch_size)
    length = 2 + sum(n_patch + 2 if isinstance(p, int) else len(p) for p in pieces)
    tok = np.empty(length, np.int32)
    img = np.zeros(length, np.int32)
    tok[0] = BOS_ID
    at, blocks = 1, []  # blocks: (first patch position, image index)
    for i, piece in enumerate(pieces):
        if isinstance(piece, int):
            # An image that precedes its caption (a caption example whose text comes next).
            first = record.kind == CAPTION and i + 1 < len(pieces)
            tok[at] = BOI_ID
            tok[at + 1 : at + 1 + n_patch] = (
                IMAGE_FIRST_MARK if spec.mark_image_first and first else 0
            )
            tok[at + 1 + n_patch] = EOI_ID
            img[at + 1 : at + 1 + n_patch] = piece + 1
            blocks.append((at + 1, piece))
            at += n_patch + 2
        else:
            tok[at : at + len(piece)] = piece
            at += len(piece)
    tok[at] = EOS_ID
    if length > spec.seq_len:
        if spec.overlong == "drop":
            counters = counters if counters is not None else Counters()
            counters.overlong_dropped += 1
            return None
        # Keep tok[:cut] for the largest cut that ends on text and not on a BOI, so no image
        # block is split and none is opened without its patches.
        head_tok, head_img = tok[: spec.seq_len], img[: spec.seq_len]
        cut = int(np.flatnonzero((head_img == 0) & (head_tok != BOI_ID)).max()) + 1
        tok, img, length = tok[:cut], img[:cut], cut
        blocks = [(s, k) for s, k in blocks if s + n_patch <= cut]
        if counters is not None:
            counters.truncated += 1
    patches = np.zeros((length, spec.patch_size**2 * spec.latent_channels), np.float32)
    if blocks:
        flat = patchify_np(latents, spec.patch_size)
        for s, k in blocks:
            patches[s : s + n_patch] = flat[k]
    return {"tokens": tok, "image_ids": img, "patches": patches}


class _ReadBlock(grain.transforms.RandomMap):
    """A block of shuffled record indices -> their sequences (one batched read, one RNG).

    Reading a block at once is ~4x cheaper per record than single reads from ArrayRecord
    (`__getitems__`), and one Philox generator per block instead of per record saves as much
    again; both matter because the packer itself costs only ~60 µs per example.
    """

    def __init__(self, source: Sequence[Record], spec: SequenceSpec, counters: Counters):
        self._source, self._spec, self._counters = source, spec, counters

    def _read(self, indices: list[int]) -> list[Record | None]:
        if hasattr(self._source, "__getitems__"):
            try:
                return list(self._source.__getitems__(indices))
            except Exception:  # find the bad record(s) one by one below
                pass
        return [self._read_one(i) for i in indices]

    def _read_one(self, index: int) -> Record | None:
        try:
            return self._source[index]
        except Exception as e:
            if self._spec.on_error == "raise":
                raise ValueError(
                    f"record {index} of {self._source!r} cannot be read: {e}. Set "
                    "data.on_error=skip to skip such records (they are counted)."
                ) from e
            self._counters.decode_errors += 1
            log.warning("skipping unreadable record %d (%s)", index, e)
            return None

    def random_map(self, indices: np.ndarray, rng: np.random.Generator) -> list[dict]:
        out = []
        for index, record in zip(indices.tolist(), self._read(indices.tolist()), strict=True):
            if record is None:
                continue
            try:
                seq = to_sequence(record, rng, self._spec, self._counters)
            except Exception as e:  # a record that does not match its images
                if self._spec.on_error == "raise":
                    raise ValueError(f"record {index} of {self._source!r}: {e}") from e
                self._counters.decode_errors += 1
                log.warning("skipping bad record %d (%s)", index, e)
                continue
            if seq is not None:
                # One packed feature for both id streams: the packer's cost is per feature.
                ids = np.stack([seq["tokens"], seq["image_ids"]], 1)
                out.append({"ids": ids, "patches": seq["patches"]})
        return out


class _Unblock(grain.experimental.FlatMapTransform):
    def __init__(self, block: int):
        self.max_fan_out = block

    def flat_map(self, element: list[dict]) -> list[dict]:
        return element


def _finalize(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "tokens": np.ascontiguousarray(row["ids"][:, 0]),
        "segment_ids": row["ids_segment_ids"].astype(np.int32),
        "positions": row["ids_positions"].astype(np.int32),
        "image_ids": np.ascontiguousarray(row["ids"][:, 1]),
        "patches": row["patches"],
    }


def packed_dataset(
    source: Sequence[Record],
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
    read_threads: int = 0,
    read_block: int = 64,
    counters: Counters | None = None,
) -> grain.IterDataset:
    """The packed, batched dataset of this host.

    Args:
      source: random-access encoded records (`encoded.EncodedSource`, or a list of
        `encoded.encode_example` results).
      spec: sequence layout options.
      batch_size: rows per batch on this host (global batch / process count).
      seed: shuffling, caption order and bin shuffling all derive from it.
      num_epochs: None repeats forever.
      process_index, process_count: this host's shard of the source.
      num_packing_bins: first-fit bins (more: better packing, more memory).
      worker_count: >0 adds Grain multiprocess prefetch with that many workers.
      read_threads: threads reading and sequencing blocks ahead of the packer (helps remote
        storage; 0 reads in the iterating thread, the fastest per core for local files).
      read_block: shuffled records read at once.
      counters: receives what was dropped (in this process).

    Returns:
      A Grain IterDataset; `iter()` gives a checkpointable iterator of layout-format batches.
    """
    counters = counters if counters is not None else Counters()
    ds = grain.MapDataset.range(len(source))[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).batch(read_block)
    ds = ds.random_map(_ReadBlock(source, spec, counters), seed=seed + 1)
    # Grain's default read-ahead (16 threads, 500 elements) polls its whole buffer for every
    # element: slower than the packer itself on one core (benchmarks/RESULTS.md).
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
    )
    it = grain.experimental.FlatMapIterDataset(it, _Unblock(read_block))
    T = spec.seq_len
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={"ids": T, "patches": T},
        num_packing_bins=num_packing_bins,
        seed=seed + 2,
        shuffle_bins=shuffle,
    )
    it = it.map(_finalize).batch(batch_size, drop_remainder=True)
    if worker_count > 0:
        # Grain's workers read absl flags, which a non-absl program never parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it
