"""The Grain input pipeline: encoded examples → interleaved token/patch sequences → batches.

The plan (the same in every process; layouts only, nothing read but the length index):
    random-access source of encoded examples (token ids + VAE latents, `data/encoded.py`)
      → seeded global shuffle, repeat
      → arrangement and layout of each example (`to_sequence(..., with_patches=False)` on its
        `encoded.shell`): images as BOI, I patch slots, EOI between the text pieces (caption
        before the image with probability 0.8, Transfusion §4.1; dropped with probability
        p_uncond for classifier-free guidance); an over-long example by `data.overlong`: a
        text document continues across rows, a caption is cut beside its image, an interleaved
        document keeps what fits up to an image boundary (or, with drop, it is left out)
      → first-fit packing (Grain's FirstFitPackIterDataset) of (record, piece, arrangement)
        references into rows of seq_len with segment ids and positions; a sequence is never
        split, so neither is an image
      → global batches
(The per-example layout, its counters and messages: `tfx_jax.data.sequence`.)
Then, per process (`_Materialize`):
      → this process's rows: one batched read of their records, each sequence laid out by
        `to_sequence` with the planned arrangement, in the `tfx_jax.layout` format
      → (optional) multiprocess prefetch

Because the plan is global, N processes see exactly the batches one process would, and the
iterator's position (`get_state()`/`set_state()`, stored in the checkpoint) is the same in
every process: a checkpoint from N processes resumes on M exactly.

Nothing is lost silently and nothing hangs: `Counters` count every over-long, truncated,
dropped and unreadable example, a pass over the source logs them, and `DataLossError` (one line:
how many, why, which settings fix it) stops the pipeline when more than
`data.max_lost_fraction` of the examples are lost or when none of them can be packed.

Tokenizing and VAE encoding happen once, before training (`python -m tfx_jax data encode`), so
the hot path is plan → pack → read → lay out. Deterministic from the seed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import grain
import numpy as np
from absl import flags

from tfx_jax.data.encoded import Record
from tfx_jax.data.sequence import (
    AS_STORED,
    Counters,
    SequenceSpec,
    arrangement,
    fixes,
    lost_message,
    to_sequence,
)
from tfx_jax.data.sources import DataLossError, RecordError

log = logging.getLogger(__name__)


def _name(source: Sequence[Record]) -> str:
    """The source for messages: its repr (EncodedSource(path)), or for a plain list or one with
    a long repr, its type and length. Only for messages: a list's repr costs seconds."""
    text = "" if isinstance(source, list | tuple) else repr(source)
    return text if 0 < len(text) <= 200 else f"a {type(source).__name__} of {len(source)} records"


def _read_shells(source: Sequence[Record], indices: list[int]) -> list[Record]:
    """Layout-only records for the plan: `source.read_shells` (an index; no tokens or latents
    read) where the source has it, else the records themselves."""
    if hasattr(source, "read_shells"):
        return source.read_shells(indices)
    return _read_records(source, indices)


def _read_records(source: Sequence[Record], indices: list[int]) -> list[Record]:
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(indices))
    return [source[i] for i in indices]


def _read_or_skip(
    read, source, indices: list[int], spec: SequenceSpec, counters: Counters, note: str = ""
) -> tuple[list[Record | None], str]:
    """`read(indices)` at once; if that fails, one by one, so that an unreadable record stops
    the pipeline naming it (on_error=raise) or is counted and given as None (skip).

    Returns:
      (the records, None for the unreadable; the last read error, "" when none).
    """
    try:
        return list(read(indices)), ""
    except Exception:  # find the bad record(s) one by one below
        pass
    out: list[Record | None] = []
    last = ""
    for index in indices:
        try:
            out.append(read([index])[0])
        except Exception as e:
            if spec.on_error == "raise":
                raise RecordError(
                    f"record {index} of {_name(source)} cannot be read: {e}. Set "
                    "data.on_error=skip to skip such records (they are counted)."
                ) from e
            counters.decode_errors += 1
            last = f"record {index}: {e}"
            log.warning("skipping unreadable record %d (%s)%s", index, e, note)
            out.append(None)
    return out, last


class _PlanBlock(grain.transforms.RandomMap):
    """A block of the global shuffled order -> the plans of their sequences.

    A plan is a sequence's length and where it comes from: a [L, 4] int32 array that repeats
    (record index, piece k of the record's sequences, arrangement, images in it). The packer
    packs these, so every process packs the same global rows from layout alone (cheap: shells,
    `_read_shells`), and each then reads and lays out only the records of its own rows
    (`_Materialize`).

    Reading a block at once is ~4x cheaper per record than single reads from ArrayRecord
    (`__getitems__`), and one Philox generator per block instead of per record saves as much
    again; both matter because the packer itself costs only ~60 µs per example.

    It also watches what it reads, so that a pipeline that cannot make batches says so instead
    of hanging and one that loses much of its data stops instead of training on the rest:
      - `patience` different records in a row (at most the source) that give no sequence ->
        DataLossError (every example over-long and dropped, too long to fit, or unreadable);
      - more than `max_lost_fraction` of the records read lost -> DataLossError, checked after
        one pass over the source and, with a margin for sampling noise, after `early` records;
      - after one pass, the counts are logged (over-long, unreadable).
    Every process plans the whole global batch, so these counts are global and the same in all.
    """

    EARLY, EARLY_MARGIN, PATIENCE = 1000, 0.05, 1000

    def __init__(self, source: Sequence[Record], spec: SequenceSpec, counters: Counters):
        self._source, self._spec, self._counters = source, spec, counters
        self._size = len(source)
        self._patience = max(1, min(self._size, self.PATIENCE))
        self._rejected: set[int] = set()  # distinct records rejected since the last sequence
        self._last_error = ""
        self._checked_early = self._checked_pass = False

    def _read(self, indices: list[int]) -> list[Record | None]:
        read = lambda ix: _read_shells(self._source, ix)
        records, error = _read_or_skip(read, self._source, indices, self._spec, self._counters)
        self._last_error = error or self._last_error
        return records

    def random_map(self, indices: np.ndarray, rng: np.random.Generator) -> list[dict]:
        out = []
        c = self._counters
        for index, record in zip(indices.tolist(), self._read(indices.tolist()), strict=True):
            c.examples += 1
            seqs, arrange = [], AS_STORED
            if record is not None:
                try:
                    arrange = arrangement(record, rng, self._spec)
                    seqs = to_sequence(
                        record, None, self._spec, c, arrange=arrange, with_patches=False
                    )
                except Exception as e:  # a record that does not match its images
                    if self._spec.on_error == "raise":
                        raise RecordError(f"record {index} of {_name(self._source)}: {e}") from e
                    c.decode_errors += 1
                    self._last_error = f"record {index}: {e}"
                    log.warning("skipping bad record %d (%s)", index, e)
            if not seqs:
                self._rejected.add(index)
                continue
            self._rejected.clear()
            for k, seq in enumerate(seqs):
                images = len(np.unique(seq["image_ids"])) - 1 if seq["image_ids"].any() else 0
                ref = np.array([index, k, arrange, images], np.int32)
                out.append({"ref": np.broadcast_to(ref, (len(seq["tokens"]), 4))})
        self._check()
        return out

    def _check(self) -> None:
        c, spec = self._counters, self._spec
        what = _name(self._source)
        if len(self._rejected) >= self._patience:
            unreadable = f"; last error: {self._last_error}" if self._last_error else ""
            raise DataLossError(
                f"the input pipeline read {c.examples} examples of {what} and none of "
                f"the last {len(self._rejected)} can be packed, so no batch can be made: "
                f"{c.overlong_summary(spec.seq_len)}; {c.decode_errors} unreadable{unreadable}. "
                f"{fixes(c, spec)}"
            )
        if not self._checked_pass and c.examples >= self._size:
            self._checked_pass = self._checked_early = True
            level = logging.WARNING if c.overlong or c.decode_errors else logging.INFO
            log.log(
                level,
                "input pipeline, first pass over %s: %s; %d unreadable",
                what,
                c.overlong_summary(spec.seq_len),
                c.decode_errors,
            )
            if c.lost > spec.max_lost_fraction * c.examples:
                raise DataLossError(lost_message(c, spec, what))
        if not self._checked_early and c.examples >= self.EARLY:
            self._checked_early = True
            if c.lost > (spec.max_lost_fraction + self.EARLY_MARGIN) * c.examples:
                raise DataLossError(lost_message(c, spec, f"the first examples read of {what}"))


class _Unblock(grain.experimental.FlatMapTransform):
    def __init__(self, block: int):
        self.max_fan_out = block

    def flat_map(self, element: list[dict]) -> list[dict]:
        return element


class _Materialize(grain.transforms.Map):
    """A planned global batch -> this process's rows of it, in the `tfx_jax.layout` format.

    Process p of P takes rows [p·R, (p+1)·R) (R = global rows / P), reads the records those
    rows hold (one batched read) and lays each sequence out where the plan put it: the same
    `to_sequence`, with the arrangement the plan drew, so a row is exactly what one process
    alone would have made of it.
    """

    def __init__(
        self,
        source,
        spec: SequenceSpec,
        rows: slice,
        counters: Counters,
        patch_dim: int,
        parts: Sequence[MixturePart] = (),
    ):
        self._source, self._spec, self._rows = source, spec, rows
        self._counters, self._P = counters, patch_dim
        self._names = [p.name for p in parts]
        self._bounds = np.asarray([p.offset for p in parts[1:]], np.int64)

    def _stats(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Positions, sequences and images of each mixture part in the whole global batch
        (`stats/<part>/...`; the same in every process): the ratio a run actually trains on."""
        ref, seg, pos = batch["ref"], batch["ref_segment_ids"], batch["ref_positions"]
        part = np.searchsorted(self._bounds, ref[..., 0], side="right")
        real = seg > 0
        first = real & (pos == 0)
        out = {}
        for k, name in enumerate(self._names):
            mine = part == k
            out[f"stats/{name}/tokens"] = np.int64(np.count_nonzero(real & mine))
            out[f"stats/{name}/sequences"] = np.int64(np.count_nonzero(first & mine))
            out[f"stats/{name}/images"] = np.int64(ref[..., 3][first & mine].sum())
        return out

    def _records(self, indices: list[int]) -> dict[int, Record | None]:
        read = lambda ix: _read_records(self._source, ix)
        records, _ = _read_or_skip(
            read, self._source, indices, self._spec, self._counters, " (its slot is padding)"
        )
        return dict(zip(indices, records, strict=True))

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ref = batch["ref"][self._rows]
        segments = batch["ref_segment_ids"][self._rows].astype(np.int32)
        positions = batch["ref_positions"][self._rows].astype(np.int32)
        R, T = segments.shape
        tokens = np.zeros((R, T), np.int32)
        image_ids = np.zeros((R, T), np.int32)
        patches = np.zeros((R, T, self._P), np.float32)
        starts = np.argwhere((positions == 0) & (segments > 0))
        records = self._records(sorted({int(ref[r, s, 0]) for r, s in starts}))
        made: dict[tuple[int, int], list[dict]] = {}
        for r, s in starts.tolist():
            index, k, arrange = (int(x) for x in ref[r, s, :3])
            length = int(np.count_nonzero(segments[r] == segments[r, s]))
            record = records[index]
            if record is None:  # unreadable now (it was readable when planned): padding
                segments[r, s : s + length] = positions[r, s : s + length] = 0
                continue
            if (index, arrange) not in made:
                made[index, arrange] = to_sequence(record, None, self._spec, arrange=arrange)
            seq = made[index, arrange][k]
            if len(seq["tokens"]) != length:
                raise RecordError(
                    f"record {index} of {_name(self._source)} changed since the pipeline planned "
                    f"it ({len(seq['tokens'])} positions, planned {length}): its index does not "
                    "match the records. Re-run `python -m tfx_jax data encode`."
                )
            tokens[r, s : s + length] = seq["tokens"]
            image_ids[r, s : s + length] = seq["image_ids"]
            patches[r, s : s + length] = seq["patches"]
        out = {
            "tokens": tokens,
            "segment_ids": segments,
            "positions": positions,
            "image_ids": image_ids,
            "patches": patches,
        }
        if self._names:
            out.update(self._stats(batch))
        return out


@dataclasses.dataclass(frozen=True)
class MixturePart:
    """One source of a mixture inside the concatenated records: [offset, offset + size)."""

    name: str
    offset: int
    size: int
    weight: float


def _mean_length(source, part: MixturePart, spec: SequenceSpec, sample: int = 2048) -> float:
    """Mean positions per example of a part, from the layouts of a fixed sample of it."""
    take = np.random.default_rng(0).permutation(part.size)[:sample] + part.offset
    plain = dataclasses.replace(spec, caption_drop_prob=0.0)
    total = 0
    for record in _read_shells(source, take.tolist()):
        seqs = to_sequence(record, None, plain, arrange=AS_STORED, with_patches=False)
        total += sum(len(q["tokens"]) for q in seqs)
    return max(total / max(len(take), 1), 1.0)


def mixture_weights(
    source, parts: Sequence[MixturePart], spec: SequenceSpec, by: str
) -> list[float]:
    """Grain's mix draws examples; a share of tokens w_k becomes an example weight
    w_k / (mean positions per example of part k), so long documents do not crowd out captions
    (Transfusion §4.1 states its mix in tokens)."""
    weights = [p.weight for p in parts]
    if by == "tokens":
        weights = [p.weight / _mean_length(source, p, spec) for p in parts]
    total = sum(weights)
    return [w / total for w in weights]


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
    parts: Sequence[MixturePart] = (),
    mix_by: str = "tokens",
) -> grain.IterDataset:
    """This process's rows of the packed global batches.

    The plan is global: every process shuffles all of `source` the same way, lays out each
    example's sequences from its layout alone (no tokens or latents read, `_PlanBlock`) and
    packs them into the same global batches; then it reads and fills in only its own rows
    (`_Materialize`). So the batches do not depend on the process count, and neither does the
    iterator's position: a checkpoint made by N processes resumes on M exactly where it stopped
    (`position_is_global`), no example skipped or repeated.

    Args:
      source: random-access encoded records (`encoded.EncodedSource`, or a list of
        `encoded.encode_example` results).
      spec: sequence layout options.
      batch_size: rows of the GLOBAL batch (all processes); each process gets batch_size / P.
      seed: shuffling, caption order and bin shuffling all derive from it.
      num_epochs: None repeats forever.
      process_index, process_count: which rows of each global batch are this process's.
      num_packing_bins: first-fit bins (more: better packing, more memory).
      worker_count: >0 adds Grain multiprocess prefetch with that many workers.
      read_threads: threads planning blocks ahead of the packer (helps remote storage; 0 plans
        in the iterating thread, the fastest per core for local files).
      read_block: shuffled records planned at once.
      counters: receives what was read, cut, dropped and skipped (global: every process plans
        every example).
      parts: a mixture: `source` is its parts end to end; each is shuffled on its own and drawn
        at its weight (`mixture_weights`, by `mix_by`: "tokens" or "examples"); each batch then
        carries `stats/<part>/{tokens,sequences,images}` of the whole global batch.

    Raises:
      DataLossError: at once if the source is empty; while iterating, if none of the examples
        can be packed or more than `spec.max_lost_fraction` of them are lost.
      ValueError: batch_size does not split evenly over the processes.

    Returns:
      A Grain IterDataset; `iter()` gives a checkpointable iterator of layout-format batches.
    """
    counters = counters if counters is not None else Counters()
    if batch_size % process_count:
        raise ValueError(
            f"data.global_batch_size={batch_size} does not split over {process_count} processes: "
            "make it a multiple of the process count."
        )
    if not len(source):
        raise DataLossError(
            f"{_name(source)} has no examples: there is nothing to make batches of. Check that "
            "the split has examples (`python -m tfx_jax data build` lists them; `data encode` "
            "counts what it wrote)."
        )
    if parts:
        # Each part shuffled and repeated on its own, then drawn at its weight: Grain's mix is
        # deterministic by index, so the position stays one global, checkpointable state.
        streams = []
        for k, part in enumerate(parts):
            one = grain.MapDataset.range(part.size)
            if shuffle:
                one = one.shuffle(seed=seed + 7919 * (k + 1))
            streams.append(one.repeat(num_epochs).map(lambda i, o=part.offset: i + o))
        ds = grain.MapDataset.mix(streams, mixture_weights(source, parts, spec, mix_by))
    else:
        ds = grain.MapDataset.range(len(source))
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(num_epochs)
    ds = ds.batch(read_block)
    ds = ds.random_map(_PlanBlock(source, spec, counters), seed=seed + 1)
    # Grain's default read-ahead (16 threads, 500 elements) polls its whole buffer for every
    # element: slower than the packer itself on one core (benchmarks/RESULTS.md).
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
    )
    it = grain.experimental.FlatMapIterDataset(it, _Unblock(read_block))
    T = spec.seq_len
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={"ref": T},
        num_packing_bins=num_packing_bins,
        seed=seed + 2,
        shuffle_bins=shuffle,
    )
    it = it.batch(batch_size, drop_remainder=True)
    rows = batch_size // process_count
    mine = slice(process_index * rows, (process_index + 1) * rows)
    P = spec.patch_size**2 * spec.latent_channels
    it = it.map(_Materialize(source, spec, mine, counters, P, parts))
    if worker_count > 0:
        # Grain's workers read absl flags, which a non-absl program never parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it
