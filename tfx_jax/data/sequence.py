"""One encoded example → one model sequence: the layout contract of the input pipeline.

`to_sequence` lays out an example's text pieces and images as token/patch sequences in the
`tfx_jax.layout` format: BOS, text, BOI, I patch slots (the latents cut into p × p patches),
EOI, …, EOS; a caption precedes its image with probability `caption_first_prob` (Transfusion
§4.1: 0.8) and is dropped with `caption_drop_prob` (classifier-free guidance); an over-long
example is split, cut or dropped by `overlong`. `arrangement` draws those choices alone, so the
packer can plan rows from layouts (`with_patches=False`) and the reader lay out the same
sequences later. `Counters` count every example that is continued, truncated, dropped or
unreadable; `lost_message` / `fixes` turn them into the one-line errors of `DataLossError`, and
`survey` gives the encode stage its report. The Grain pipeline around this is
`tfx_jax.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from tfx_jax.data.encoded import CAPTION, Record
from tfx_jax.data.tokenizer import BOI_ID, BOS_ID, EOI_ID, EOS_ID
from tfx_jax.layout import IMAGE_FIRST_MARK, patchify_np

if TYPE_CHECKING:
    from tfx_jax.data.config import RunConfig


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
    """How an example becomes token/patch sequences.

    Attributes:
      seq_len: packed row length T.
      patch_size: p; a latent [h, w, C] becomes (h/p)(w/p) patches of p*p*C floats.
      latent_channels: C.
      caption_first_prob: probability that a caption precedes its image (paper: 0.8).
      overlong: what happens to an example longer than seq_len (`DataConfig.overlong`):
        "split" (text documents continue across rows; captions are cut to fit beside their
        image; interleaved documents keep what fits, up to an image boundary), "truncate" (the
        same, but text documents keep only their first seq_len tokens) or "drop".
      on_error: "skip" a record that fails to decode (counted) or "raise".
      caption_drop_prob: p_uncond, probability that a caption example loses its caption and
        becomes BOS, image block, EOS, so classifier-free guidance has an unconditional model
        to subtract (Ho & Salimans 2022, §3.2).
      mark_image_first: set `tokens` to `layout.IMAGE_FIRST_MARK` on the patches of an image
        that precedes its caption (read by the train step's noise limit, Transfusion §4.3).
      max_lost_fraction: the packed dataset stops (`DataLossError`) when more than this share
        of the examples it reads are lost (dropped as over-long, or unable to fit at all).
    """

    seq_len: int
    patch_size: int
    latent_channels: int
    caption_first_prob: float = 0.8
    overlong: str = "split"
    on_error: str = "skip"
    caption_drop_prob: float = 0.0
    mark_image_first: bool = False
    max_lost_fraction: float = 0.01

    @classmethod
    def of(cls, cfg: RunConfig) -> SequenceSpec:
        """How a run lays out and packs examples (also what `data encode` reports against)."""
        d, m = cfg.data, cfg.model
        return cls(
            seq_len=d.seq_len,
            patch_size=m.patch_size,
            latent_channels=m.latent_channels,
            caption_first_prob=d.caption_first_prob,
            overlong=d.overlong,
            on_error=d.on_error,
            caption_drop_prob=cfg.diffusion.p_uncond,
            mark_image_first=cfg.diffusion.noise_limit_image_first,
            max_lost_fraction=d.max_lost_fraction,
        )


@dataclasses.dataclass
class Counters:
    """What the pipeline did with the examples it read, counted in this process (Grain workers
    keep their own). Every over-long example is counted once in `overlong` and once in exactly
    one of `split`, `truncated`, `overlong_dropped` or `unfittable`."""

    examples: int = 0  # records read, readable or not
    overlong: int = 0  # longer than seq_len
    split: int = 0  # text documents continued across rows (overlong=split): nothing lost
    truncated: int = 0  # cut to fit: a caption shortened, a document's tail left out
    overlong_dropped: int = 0  # left out by overlong=drop
    unfittable: int = 0  # cannot fit at all under any policy (an image with no room)
    decode_errors: int = 0  # unreadable records (on_error=skip)

    @property
    def lost(self) -> int:
        """Examples of which nothing reaches a batch because of their length."""
        return self.overlong_dropped + self.unfittable

    def overlong_summary(self, seq_len: int) -> str:
        """E.g. "3 of 120 examples are longer than data.seq_len=128: 2 continued across rows, 1
        truncated, 0 dropped, 0 cannot fit"."""
        if not self.overlong:
            return f"none of {self.examples} examples is longer than data.seq_len={seq_len}"
        return (
            f"{self.overlong} of {self.examples} examples are longer than data.seq_len={seq_len}: "
            f"{self.split} continued across rows, {self.truncated} truncated, "
            f"{self.overlong_dropped} dropped, {self.unfittable} cannot fit"
        )


def lost_message(counters: Counters, spec: SequenceSpec, what: str) -> str:
    """One line for `DataLossError`: how many of `what` are lost, why, and what fixes it."""
    why = []
    if counters.overlong_dropped:
        why.append(
            f"{counters.overlong_dropped} longer than data.seq_len={spec.seq_len} and dropped by "
            f"data.overlong={spec.overlong}"
        )
    if counters.unfittable:
        why.append(f"{counters.unfittable} with an image that cannot fit in data.seq_len")
    share = counters.lost / max(counters.examples, 1)
    return (
        f"{counters.lost} of {counters.examples} examples of {what} ({share:.1%}) would be lost, "
        f"more than data.max_lost_fraction={spec.max_lost_fraction}: {'; '.join(why)}. "
        f"{fixes(counters, spec, lost=True)}"
    )


def fixes(counters: Counters, spec: SequenceSpec, lost: bool = False) -> str:
    """ "Fix: ..." naming the settings that address what `counters` saw."""
    out = []
    if counters.overlong_dropped:
        out.append("set data.overlong=split (text continues across rows, captions are cut)")
    if counters.overlong_dropped or counters.unfittable:
        out.append(f"raise data.seq_len (now {spec.seq_len})")
    if counters.unfittable:
        out.append("use fewer patches per image (model.patch_size, vae.downsample)")
    if counters.decode_errors:
        out.append("fix or remove the unreadable records (the log names them)")
    if lost:
        out.append(f"raise data.max_lost_fraction (now {spec.max_lost_fraction})")
    return f"Fix: {'; or '.join(out)}." if out else "Check data.path and data.source."


def _length(pieces: list, n_patch: int) -> int:
    return 2 + sum(n_patch + 2 if isinstance(p, int) else len(p) for p in pieces)


def _layout(
    pieces: list, n_patch: int, length: int, first_mark: bool
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """BOS, pieces (text tokens, image blocks BOI + n_patch slots + EOI), EOS (`length` in all)
    -> (tokens, image ids, blocks as (first patch position, image index))."""
    tok = np.empty(length, np.int32)
    img = np.zeros(length, np.int32)
    tok[0] = BOS_ID
    at, blocks = 1, []
    for i, piece in enumerate(pieces):
        if isinstance(piece, int):
            # An image that precedes its caption (a caption example whose text comes next).
            first = first_mark and i + 1 < len(pieces)
            tok[at] = BOI_ID
            tok[at + 1 : at + 1 + n_patch] = IMAGE_FIRST_MARK if first else 0
            tok[at + 1 + n_patch] = EOI_ID
            img[at + 1 : at + 1 + n_patch] = piece + 1
            blocks.append((at + 1, piece))
            at += n_patch + 2
        else:
            tok[at : at + len(piece)] = piece
            at += len(piece)
    tok[at] = EOS_ID
    return tok, img, blocks


# How a caption example is laid out this epoch (drawn once, in the plan; `arrangement`).
AS_STORED, IMAGE_FIRST, UNCONDITIONAL = range(3)


def arrangement(record: Record, rng: np.random.Generator, spec: SequenceSpec) -> int:
    """Draws a caption example's layout for this epoch: caption first (`AS_STORED`) with
    probability `caption_first_prob`, else `IMAGE_FIRST`; `UNCONDITIONAL` (caption dropped) with
    probability p_uncond. Other examples are always `AS_STORED` and draw nothing."""
    if not (record.kind == CAPTION and len(record.pieces) == 2):
        return AS_STORED
    # Draw only when dropping is on, so p_uncond = 0 leaves every other draw unchanged.
    if spec.caption_drop_prob > 0 and rng.random() < spec.caption_drop_prob:
        return UNCONDITIONAL
    return AS_STORED if rng.random() < spec.caption_first_prob else IMAGE_FIRST


def to_sequence(
    record: Record,
    rng: np.random.Generator | None,
    spec: SequenceSpec,
    counters: Counters | None = None,
    *,
    arrange: int | None = None,
    with_patches: bool = True,
) -> list[dict[str, np.ndarray]]:
    """One encoded example -> its sequences {"tokens", "image_ids" [L], "patches" [L, P]}: one,
    several (a text document continued across rows) or none (lost; counted).

    Layout: BOS, then text pieces and image blocks (BOI, I patch slots, EOI) in document order,
    then EOS. Image k (1-based) of the document marks its patches with image id k. A caption
    example's order (caption first with probability `caption_first_prob`) and its caption
    dropout are drawn from `rng` (`arrangement`) unless `arrange` gives them. An example longer
    than seq_len is handled by `spec.overlong` (see `SequenceSpec`); images are never split.
    `with_patches=False` leaves "patches" out (the plan needs only lengths).
    """
    counters = counters if counters is not None else Counters()
    T = spec.seq_len
    pieces = record.pieces
    caption = record.kind == CAPTION and len(pieces) == 2
    arrange = arrangement(record, rng, spec) if arrange is None else arrange
    if caption and arrange == UNCONDITIONAL:
        pieces = [0]
    elif caption and arrange == IMAGE_FIRST:
        pieces = [0, pieces[0]]
    latents = record.latents
    n_patch = (latents.shape[1] // spec.patch_size) * (latents.shape[2] // spec.patch_size)
    n_images = len(latents)
    length = _length(pieces, n_patch)
    if length > T:
        counters.overlong += 1
        if spec.overlong == "drop":
            if n_images and n_patch + 3 > T:  # no image of it could fit under any policy
                counters.unfittable += 1
            else:
                counters.overlong_dropped += 1
            return []
        if caption and not isinstance(pieces[0], int):
            # Caption first: shorten the caption so that its image (and EOS) still fit.
            keep = len(pieces[0]) - (length - T)
            pieces = [pieces[0][:keep], 0] if keep > 0 else [0]
            length = _length(pieces, n_patch)
            if length <= T:
                counters.truncated += 1
    first_mark = spec.mark_image_first and record.kind == CAPTION
    tok, img, blocks = _layout(pieces, n_patch, length, first_mark)
    P = spec.patch_size**2 * spec.latent_channels
    if length > T:
        if not n_images and spec.overlong == "split":
            # A text document continues across rows: BOS on the first piece, EOS on the last.
            counters.split += 1
            out = [
                {"tokens": tok[s : s + T], "image_ids": img[s : s + T]} for s in range(0, length, T)
            ]
            if with_patches:
                for seq in out:
                    seq["patches"] = np.zeros((len(seq["tokens"]), P), np.float32)
            return out
        # Keep tok[:cut] for the largest cut that ends on text and not on a BOI, so no image
        # block is split and none is opened without its patches.
        head_tok, head_img = tok[:T], img[:T]
        cut = int(np.flatnonzero((head_img == 0) & (head_tok != BOI_ID)).max()) + 1
        blocks = [(s, k) for s, k in blocks if s + n_patch <= cut]
        if cut <= 1 or (record.kind == CAPTION and not blocks):
            counters.unfittable += 1  # nothing but BOS, or a caption without its image
            return []
        tok, img, length = tok[:cut], img[:cut], cut
        counters.truncated += 1
    if not with_patches:
        return [{"tokens": tok, "image_ids": img}]
    patches = np.zeros((length, P), np.float32)
    if blocks:
        flat = patchify_np(latents, spec.patch_size)
        for s, k in blocks:
            patches[s : s + n_patch] = flat[k]
    return [{"tokens": tok, "image_ids": img, "patches": patches}]


_SURVEY_RNG = np.random.default_rng(0)


def survey(record: Record, spec: SequenceSpec, counters: Counters) -> None:
    """Counts what `to_sequence` would do with `record` (caption first, no caption dropout),
    cheaply: only an over-long record is laid out. For the encode stage's report."""
    counters.examples += 1
    latents = record.latents
    n_patch = (latents.shape[1] // spec.patch_size) * (latents.shape[2] // spec.patch_size)
    if _length(record.pieces, n_patch) > spec.seq_len:
        fixed = dataclasses.replace(spec, caption_first_prob=1.0, caption_drop_prob=0.0)
        to_sequence(record, _SURVEY_RNG, fixed, counters)
