"""source=synthetic: learnable text patterns and structured latents as packed batches made from
(seed, step); no files, tokenizer or VAE.

Used by tests (exact layouts, overfitting), smoke runs and benchmarks. Each document is
  BOS, text, [BOI, I patches, EOI, text]*, EOS
packed first-fit into rows of `seq_len`, in the batch format of `tfx_jax.layout`. Text follows
an arithmetic progression (a model can learn it); each latent is a smooth pattern whose
frequency depends on the document's progression step (so images are learnable and conditioned on
the preceding text).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import jax
import numpy as np

from tfx_jax.data.sources.base import Source, register
from tfx_jax.data.tokenizer import BOI_ID, BOS_ID, EOI_ID, EOS_ID
from tfx_jax.layout import patchify_np

if TYPE_CHECKING:
    from tfx_jax.data.config import RunConfig

FIRST_TEXT_ID = 6  # ids below are reserved (pad, bos, eos, unk, boi, eoi)
EVAL_SEED_OFFSET = 10_000  # a split other than train is the stream of data.seed + this


@register
class Synthetic(Source):
    name = "synthetic"
    makes_batches = True

    def splits(self, cfg: RunConfig) -> tuple[str, ...]:
        return ("train", "validation")

    def batches(self, cfg: RunConfig, split: str) -> SyntheticIterator:
        seed = cfg.data.seed + (0 if split == "train" else EVAL_SEED_OFFSET)
        return SyntheticIterator(cfg, seed, jax.process_index(), jax.process_count())


def _latent(rng: np.random.Generator, step: int, size: int, channels: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, channels)
    freq = 1.0 + step
    lat = np.sin(2 * np.pi * freq * (xx[..., None] + yy[..., None]) / 2 + phase)
    return (lat * 1.2).astype(np.float32)


def make_document(
    rng: np.random.Generator,
    vocab_size: int,
    latent_size: int,
    latent_channels: int,
    patch_size: int,
    max_len: int,
    max_images: int = 2,
) -> tuple[list[int], list[int], list[np.ndarray]]:
    """One document: (tokens with -1 at patch slots, image id per token, list of latents)."""
    n_patches = (latent_size // patch_size) ** 2
    step = int(rng.integers(1, 4))
    value = int(rng.integers(0, vocab_size - FIRST_TEXT_ID))

    def text(n: int) -> list[int]:
        nonlocal value
        out = []
        for _ in range(n):
            out.append(FIRST_TEXT_ID + value)
            value = (value + step) % (vocab_size - FIRST_TEXT_ID)
        return out

    tokens = [BOS_ID] + text(int(rng.integers(3, 12)))
    image_ids = [0] * len(tokens)
    latents = []
    for k in range(int(rng.integers(0, max_images + 1))):
        if len(tokens) + n_patches + 2 + 4 > max_len:
            break
        lat = _latent(rng, step, latent_size, latent_channels)
        latents.append(lat)
        tokens += [BOI_ID] + [-1] * n_patches + [EOI_ID]
        image_ids += [0] + [k + 1] * n_patches + [0]
        more = text(int(rng.integers(1, 6)))
        tokens += more
        image_ids += [0] * len(more)
    tokens.append(EOS_ID)
    image_ids.append(0)
    return tokens[:max_len], image_ids[:max_len], latents


def _shape(cfg: RunConfig, batch_size: int | None = None) -> tuple:
    """`packed_batch`'s shape arguments for a run config (global batch size unless `batch_size`)."""
    m = cfg.model
    return (
        batch_size or cfg.data.global_batch_size,
        cfg.data.seq_len,
        m.vocab_size,
        m.latent_size,
        m.latent_channels,
        m.patch_size,
        cfg.max_images_per_row,
    )


def config_batch(
    cfg: RunConfig, rng: np.random.Generator, batch_size: int | None = None
) -> dict[str, np.ndarray]:
    """`packed_batch` with the shapes of a `RunConfig` (global batch size unless `batch_size`)."""
    return packed_batch(rng, *_shape(cfg, batch_size))


class SyntheticIterator:
    """An endless deterministic stream of this process's rows of packed global batches; batch i
    depends only on (seed, i).

    Checkpointable like a Grain iterator (`get_state`/`set_state` with bytes), so resumed runs see
    exactly the batches an uninterrupted run would.
    """

    # Every process builds the same global batch and keeps its own rows, so the saved position
    # does not depend on the process count (`Source.position_is_global`: a 2-host checkpoint
    # resumes on 1 host exactly).

    def __init__(self, cfg: RunConfig, seed: int, process_index: int = 0, process_count: int = 1):
        batch_size = cfg.data.global_batch_size
        if batch_size % process_count:
            raise ValueError(f"batch {batch_size} does not split over {process_count} processes")
        self._seed = seed
        self._shape = _shape(cfg)
        self._index = 0
        rows = batch_size // process_count
        self._rows = slice(process_index * rows, (process_index + 1) * rows)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self._seed, self._index])
        self._index += 1
        return {k: v[self._rows] for k, v in packed_batch(rng, *self._shape).items()}

    def get_state(self) -> bytes:
        return json.dumps({"seed": self._seed, "index": self._index}).encode()

    def set_state(self, state: bytes) -> None:
        d = json.loads(state)
        self._seed, self._index = d["seed"], d["index"]

    def start_prefetch(self) -> None:
        """Grain's checkpoint handler calls this after restoring; nothing to prefetch here."""


def _empty_batch(batch_size: int, seq_len: int, patch_dim: int) -> dict[str, np.ndarray]:
    """All-padding rows in the batch format of `tfx_jax.layout`."""
    ids = {k: np.zeros((batch_size, seq_len), np.int32) for k in LAYOUT_IDS}
    return {**ids, "patches": np.zeros((batch_size, seq_len, patch_dim), np.float32)}


LAYOUT_IDS = ("tokens", "segment_ids", "positions", "image_ids")


def packed_batch(
    rng: np.random.Generator,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    latent_size: int,
    latent_channels: int,
    patch_size: int,
    max_images_per_row: int | None = None,
) -> dict[str, np.ndarray]:
    """A batch of rows, each packed with whole documents until the next one does not fit."""
    P = patch_size * patch_size * latent_channels
    n_patches = (latent_size // patch_size) ** 2
    max_images = max_images_per_row or seq_len // (n_patches + 2)
    out = _empty_batch(batch_size, seq_len, P)
    for b in range(batch_size):
        cursor, seg, images_in_row = 0, 0, 0
        while True:
            toks, imgs, lats = make_document(
                rng, vocab_size, latent_size, latent_channels, patch_size, seq_len
            )
            n = len(toks)
            if cursor + n > seq_len or images_in_row + len(lats) > max_images:
                break
            seg += 1
            sl = slice(cursor, cursor + n)
            toks_np, imgs_np = np.asarray(toks), np.asarray(imgs)
            out["tokens"][b, sl] = np.where(toks_np < 0, 0, toks_np)
            out["segment_ids"][b, sl] = seg
            out["positions"][b, sl] = np.arange(n)
            out["image_ids"][b, sl] = imgs_np
            for k, lat in enumerate(lats):
                idx = np.flatnonzero(imgs_np == k + 1) + cursor
                out["patches"][b, idx] = patchify_np(lat, patch_size)
            cursor += n
            images_in_row += len(lats)
    return out


# Transfusion §4.1's training mix, for throughput benchmarks: half of the tokens text, from
# documents of long-tailed length (most a few hundred tokens, some whole rows), half image
# patches, from image-caption documents with the caption first 80% of the time.
PAPER_TEXT_MEDIAN = 400  # tokens; lognormal lengths, clipped to [16, seq_len]
PAPER_TEXT_SIGMA = 1.2
PAPER_CAPTION = (8, 64)  # caption length, uniform in [8, 64)
PAPER_CAPTION_FIRST = 0.8


def paper_mix_batch(
    rng: np.random.Generator,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    latent_size: int,
    latent_channels: int,
    patch_size: int,
    max_images_per_row: int | None = None,
    text_fraction: float = 0.5,
) -> dict[str, np.ndarray]:
    """Rows packed with the paper's mix of documents (`PAPER_*` above), in the batch format of
    `tfx_jax.layout`. Each next document is text while the batch's text tokens are below
    `text_fraction` of all its tokens, else an image-caption pair; one that does not fit the
    row's remaining space is cut to it (a text document, or an image's caption after it, as the
    packer continues a long document across rows), and an image that does not fit ends the row
    with a text document filling the rest. Token ids are random (throughput only), latents
    Gaussian."""
    P = patch_size * patch_size * latent_channels
    n_patches = (latent_size // patch_size) ** 2
    max_images = max_images_per_row or seq_len // (n_patches + 2)
    out = _empty_batch(batch_size, seq_len, P)
    text_tokens = image_tokens = 0

    def words(n: int) -> list[int]:
        return rng.integers(FIRST_TEXT_ID, vocab_size, n).tolist()

    for b in range(batch_size):
        cursor, seg, images = 0, 0, 0
        while seq_len - cursor >= 2:
            room = seq_len - cursor
            caption = words(int(rng.integers(*PAPER_CAPTION)))
            first = rng.random() < PAPER_CAPTION_FIRST
            # BOS, the caption if first, BOI, the patches and EOI must fit; the rest may be cut.
            image_fits = images < max_images and 3 + n_patches + len(caption) * first <= room
            if text_tokens < text_fraction * (text_tokens + image_tokens) or not image_fits:
                length = int(rng.lognormal(np.log(PAPER_TEXT_MEDIAN), PAPER_TEXT_SIGMA))
                toks = [BOS_ID, *words(max(16, min(length, seq_len)) - 2), EOS_ID][:room]
                ids = [0] * len(toks)
            else:
                image = [BOI_ID, *[-1] * n_patches, EOI_ID]
                toks = [BOS_ID, *(caption + image if first else image + caption), EOS_ID][:room]
                ids = [1 if t == -1 else 0 for t in toks]
                images += 1
            n, sl = len(toks), slice(cursor, cursor + len(toks))
            seg += 1
            toks_np, ids_np = np.asarray(toks), np.asarray(ids, np.int32)
            out["tokens"][b, sl] = np.where(toks_np < 0, 0, toks_np)
            out["segment_ids"][b, sl] = seg
            out["positions"][b, sl] = np.arange(n)
            out["image_ids"][b, sl] = ids_np
            k = np.flatnonzero(ids_np) + cursor
            out["patches"][b, k] = rng.standard_normal((len(k), P), np.float32)
            image_tokens += len(k)
            text_tokens += n - len(k)
            cursor += n
    return out
