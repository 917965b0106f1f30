"""Examples encoded once: token ids of every text piece and VAE latents of every image.

The tokenizer and the VAE are frozen while the transformer trains, so their work is done once
by `python -m tfx_jax data encode`, not every epoch in the input pipeline. What stays random per
epoch (caption before or after its image, caption dropout for guidance) is decided at read time
from these records (`sequence.to_sequence`), so nothing the paper samples is fixed here.

One record per example, in a flat binary layout that reads back with `np.frombuffer` views
(no pickling, no copies until the sequence is assembled):

    int32 header [MAGIC, kind, n_pieces, n_images, h, w, C, piece_0, ..., piece_{n-1}]
        piece_j >= 0: a text piece of that many tokens; piece_j < 0: image -piece_j - 1
    int32 tokens of all text pieces, in order
    float16 latents [n_images, h, w, C] (VAE posterior mean × the recorded scale factor)

A caption example is stored as [text, image 0]; the order is drawn at read time.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from tqdm.auto import tqdm

from tfx_jax.data.sources import RecordError

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
KINDS = ("caption", "interleaved", "text")
CAPTION, INTERLEAVED, TEXT = range(3)
_MAGIC = 0x54465831  # "TFX1"
_HEADER = 7


@dataclasses.dataclass
class Record:
    """A decoded record: `pieces` are int32 token arrays (text) or ints (image indices)."""

    kind: int
    pieces: list[np.ndarray | int]
    latents: np.ndarray  # float16 [n_images, h, w, C]


def text_pieces(kind: str, text: str) -> list[str | int]:
    """The document as an ordered list of text strings and image indices."""
    if kind == "caption":
        return [text, 0] if text.strip() else [0]
    if kind == "text":
        return [text] if text.strip() else []
    parts = text.split(IMAGE_PLACEHOLDER)
    out: list[str | int] = []
    for k, part in enumerate(parts):
        if part.strip():
            out.append(part.strip())
        if k < len(parts) - 1:
            out.append(k)
    return out


def checked_pieces(kind: str, text: str, n_images: int) -> list[str | int]:
    """`text_pieces`, after checking the kind and that the image positions match the images."""
    if kind not in KINDS:
        raise ValueError(f"example kind {kind!r} is not one of {KINDS}")
    pieces = text_pieces(kind, text)
    n_markers = sum(isinstance(p, int) for p in pieces)
    if n_markers != n_images:
        raise ValueError(
            f"a {kind} example has {n_markers} image positions ({IMAGE_PLACEHOLDER} markers or "
            f"its caption image) but {n_images} images"
        )
    return pieces


def encode_example(
    example: dict, encode_text: Callable[[str], list[int]], latent_shape=(0, 0, 0)
) -> Record:
    """{"kind", "text", "latents" [n, h, w, C]} -> a `Record` (text tokenized, checked).

    Raises:
      ValueError: the kind is unknown or the text's <image> markers do not match the images.
    """
    latents = example.get("latents")
    if latents is None or len(latents) == 0:
        latents = np.zeros((0, *latent_shape), np.float16)
    kind = example["kind"]
    pieces = checked_pieces(kind, example["text"], len(latents))
    return Record(
        kind=KINDS.index(kind),
        pieces=[p if isinstance(p, int) else np.asarray(encode_text(p), np.int32) for p in pieces],
        latents=np.asarray(latents, np.float16),
    )


def serialize(record: Record) -> bytes:
    lat = np.ascontiguousarray(record.latents, np.float16)
    n, h, w, c = lat.shape
    lengths = [-p - 1 if isinstance(p, int) else len(p) for p in record.pieces]
    header = np.array([_MAGIC, record.kind, len(lengths), n, h, w, c, *lengths], np.int32)
    texts = [p for p in record.pieces if not isinstance(p, int)]
    tokens = np.concatenate(texts).astype(np.int32) if texts else np.zeros(0, np.int32)
    return header.tobytes() + tokens.tobytes() + lat.tobytes()


def deserialize(data: bytes) -> Record:
    head = np.frombuffer(data, np.int32, count=_HEADER)
    if head[0] != _MAGIC:
        raise ValueError("not an encoded tfx_jax record (bad magic number)")
    kind, n_pieces, n, h, w, c = (int(x) for x in head[1:])
    lengths = np.frombuffer(data, np.int32, count=n_pieces, offset=4 * _HEADER)
    n_tokens = int(lengths[lengths >= 0].sum())
    offset = 4 * (_HEADER + n_pieces)
    tokens = np.frombuffer(data, np.int32, count=n_tokens, offset=offset)
    offset += 4 * n_tokens
    latents = np.frombuffer(data, np.float16, count=n * h * w * c, offset=offset)
    if offset + 2 * latents.size != len(data):
        raise ValueError(f"encoded record has {len(data)} bytes, its header implies more/fewer")
    pieces: list[np.ndarray | int] = []
    at = 0
    for length in lengths.tolist():
        if length < 0:
            pieces.append(-length - 1)
        else:
            pieces.append(tokens[at : at + length])
            at += length
    return Record(kind, pieces, latents.reshape(n, h, w, c))


def shell(kind: int, lengths: Sequence[int], latent_shape: Sequence[int]) -> Record:
    """A `Record` with the layout of a stored one but no content: text pieces of the right
    lengths (token 0 = PAD, never special) and latents that are a zero-size broadcast. All the
    input pipeline's plan needs (`sequence.to_sequence(..., with_patches=False)` gives exact
    lengths from it), at none of the cost of reading tokens or latents."""
    pieces: list[np.ndarray | int] = [
        -n - 1 if n < 0 else np.zeros(n, np.int32) for n in (int(x) for x in lengths)
    ]
    n_images = sum(isinstance(p, int) for p in pieces)
    latents = np.broadcast_to(np.float16(0), (n_images, *latent_shape))
    return Record(kind, pieces, latents)


def header(data: bytes) -> tuple[int, np.ndarray, tuple[int, int, int]]:
    """(kind, piece lengths (images as -k-1), latent shape) from a serialized record's header."""
    head = np.frombuffer(data, np.int32, count=_HEADER)
    if head[0] != _MAGIC:
        raise ValueError("not an encoded tfx_jax record (bad magic number)")
    lengths = np.frombuffer(data, np.int32, count=int(head[2]), offset=4 * _HEADER)
    return int(head[1]), lengths, (int(head[4]), int(head[5]), int(head[6]))


def _lengths(record: Record) -> list[int]:
    return [-p - 1 if isinstance(p, int) else len(p) for p in record.pieces]


class LengthIndex:
    """Every record's kind and piece lengths, written beside the records by `write_encoded`
    (`<records>.index.npz`, ~13 bytes per example): the input pipeline plans its packing from
    it on every process without reading the records themselves."""

    def __init__(self, kinds: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, latent_shape):
        self.kinds, self.offsets, self.lengths = kinds, offsets, lengths
        self.latent_shape = tuple(int(x) for x in latent_shape)

    @classmethod
    def of(cls, records: Sequence[Record], latent_shape) -> LengthIndex:
        per = [_lengths(r) for r in records]
        offsets = np.zeros(len(per) + 1, np.int64)
        offsets[1:] = np.cumsum([len(x) for x in per])
        flat = np.asarray([n for x in per for n in x], np.int32)
        return cls(np.asarray([r.kind for r in records], np.int8), offsets, flat, latent_shape)

    @classmethod
    def concat(cls, indexes: Sequence[LengthIndex]) -> LengthIndex:
        """The indexes of files read end to end (shards of one split), in that order."""
        if len({x.latent_shape for x in indexes}) > 1:
            raise ValueError("the indexes have different latent shapes")
        offsets, at = [np.zeros(1, np.int64)], 0
        for x in indexes:
            offsets.append(x.offsets[1:].astype(np.int64) + at)
            at += int(x.offsets[-1])
        return cls(
            np.concatenate([x.kinds for x in indexes]).astype(np.int8),
            np.concatenate(offsets),
            np.concatenate([x.lengths for x in indexes]).astype(np.int32),
            indexes[0].latent_shape,
        )

    def __len__(self) -> int:
        return len(self.kinds)

    def shell(self, index: int) -> Record:
        a, b = self.offsets[index], self.offsets[index + 1]
        return shell(int(self.kinds[index]), self.lengths[a:b], self.latent_shape)

    def save(self, path: epath.Path) -> None:
        buf = io.BytesIO()
        np.savez(
            buf,
            kinds=self.kinds,
            offsets=self.offsets,
            lengths=self.lengths,
            latent_shape=np.asarray(self.latent_shape, np.int32),
        )
        path.write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: epath.Path) -> LengthIndex:
        with np.load(io.BytesIO(path.read_bytes())) as z:
            return cls(z["kinds"], z["offsets"], z["lengths"], z["latent_shape"])


def index_path(path: epath.Path) -> epath.Path:
    return path.parent / (path.name + ".index.npz")


def encode_block(
    examples: Sequence[dict],
    encode_text: Callable[[str], list[int]],
    encode_images: Callable[[np.ndarray], np.ndarray] | None,
    latent_shape: tuple[int, int, int],
) -> list[Record]:
    """Raw examples -> `Record`s, all their images through one `encode_images` call."""
    images = [im for ex in examples for im in ex["images"]]
    if images and encode_images is None:
        raise ValueError("the source is text-only but an example has images")
    lat = (
        np.asarray(encode_images(np.stack(images)), np.float16)
        if images
        else np.zeros((0, *latent_shape), np.float16)
    )
    out, at = [], 0
    for ex in examples:
        n = len(ex["images"])
        out.append(encode_example({**ex, "latents": lat[at : at + n]}, encode_text, latent_shape))
        at += n
    return out


@dataclasses.dataclass
class EncodeStats:
    """What `write_encoded` wrote and skipped (`too_small` of the `skipped` were images smaller
    than data.min_image_size; the rest could not be read or did not match their images)."""

    examples: int = 0
    images: int = 0
    tokens: int = 0
    skipped: int = 0
    too_small: int = 0

    def reasons(self) -> str:
        """Why the skipped were skipped, e.g. "2 unreadable, 1 too small"."""
        unreadable = self.skipped - self.too_small
        parts = [f"{unreadable} unreadable"] if unreadable else []
        return ", ".join(parts + ([f"{self.too_small} too small"] if self.too_small else []))

    def skipped_summary(self) -> str:
        """E.g. ", 3 skipped (2 unreadable, 1 too small)", or "" when none were."""
        return f", {self.skipped} skipped ({self.reasons()})" if self.skipped else ""


def write_encoded(
    path: str | epath.PathLike,
    examples: Sequence[dict],
    encode_text: Callable[[str], list[int]],
    encode_images: Callable[[np.ndarray], np.ndarray] | None,
    latent_shape: tuple[int, int, int],
    *,
    on_error: str = "skip",
    batch_size: int = 256,
    progress: bool = True,
    observe: Callable[[Record], None] | None = None,
    start: int = 0,
    stop: int | None = None,
) -> EncodeStats:
    """Encodes the examples `start:stop` of `examples` (raw: "kind", "text", "images") into
    `path` (all of them by default; a range is one shard of `data encode`).

    Args:
      path: output ArrayRecord file (written to `path.tmp`, then renamed: a crash never leaves
        a file that looks complete, and re-encoding replaces an old file atomically). In a
        bucket (`gs://`) the file is written to a local temporary directory and copied up once
        complete (ArrayRecord's writer opens local files only; its reader reads `gs://`).
      examples: random-access raw examples (`Source.open_split`); reading one may raise.
      encode_text: text -> token ids.
      encode_images: uint8 images [N, H, W, 3] -> scaled latents [N, h, w, C]; None for a
        text-only source.
      latent_shape: (h, w, C) of one latent.
      on_error: an example that cannot be read or encoded is "skip"ped (counted, logged) or
        "raise"s an error naming it.
      batch_size: images per `encode_images` call.
      observe: called with every record written (the encode stage counts the over-long ones).
      start, stop: the examples to encode (errors name an example by its index in `examples`).
    """
    stop = len(examples) if stop is None else stop
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    local_dir = tempfile.mkdtemp(prefix="tfx_encode_") if "://" in str(path) else None
    tmp = epath.Path(local_dir) / path.name if local_dir else path.parent / (path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    stats = EncodeStats()
    kinds: list[int] = []
    lengths: list[list[int]] = []
    pending: list[dict] = []  # raw examples whose images are not encoded yet
    n_pending_images = 0

    def flush() -> None:
        nonlocal pending, n_pending_images
        for record in encode_block(pending, encode_text, encode_images, latent_shape):
            writer.write(serialize(record))
            kinds.append(record.kind)
            lengths.append(_lengths(record))
            if observe is not None:
                observe(record)
            stats.examples += 1
            stats.images += len(record.latents)
            stats.tokens += sum(len(p) for p in record.pieces if not isinstance(p, int))
        pending, n_pending_images = [], 0

    def encode_all() -> None:
        nonlocal n_pending_images
        order = range(start, stop)
        name = f"encode → {path.name}"
        for i in tqdm(order, desc=name, unit=" examples", leave=False, disable=not progress):
            try:
                ex = examples[i]
                if ex["images"] and encode_images is None:
                    raise ValueError("the source is text-only but the example has images")
                # Check the text/image structure now, so a bad example never reaches a batch.
                checked_pieces(ex["kind"], ex["text"], len(ex["images"]))
            except Exception as e:
                if on_error == "raise":
                    raise RecordError(
                        f"example {i} of {examples!r} cannot be encoded: {e}. Set "
                        "data.on_error=skip to skip such examples (they are counted)."
                    ) from e
                stats.skipped += 1
                stats.too_small += isinstance(e, RecordError) and e.reason == "too small"
                log.warning("skipping example %d of %r: %s", i, examples, e)
                continue
            pending.append(ex)
            n_pending_images += len(ex["images"])
            if n_pending_images >= batch_size:
                flush()
        flush()

    try:
        encode_all()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)  # the previous file, if any, stays whole
        if local_dir:
            shutil.rmtree(local_dir, ignore_errors=True)
        raise
    writer.close()
    offsets = np.zeros(len(lengths) + 1, np.int64)
    offsets[1:] = np.cumsum([len(x) for x in lengths])
    flat = np.asarray([n for x in lengths for n in x], np.int32)
    # The index first: records without their index are still read (planned from the records
    # themselves), an index without its records never is.
    index_path(path).unlink(missing_ok=True)
    if local_dir:  # an object appears whole once its upload completes: no rename needed
        try:
            tmp.copy(path, overwrite=True)
        finally:
            shutil.rmtree(local_dir, ignore_errors=True)
    else:
        tmp.replace(path)
    LengthIndex(np.asarray(kinds, np.int8), offsets, flat, latent_shape).save(index_path(path))
    return stats


# ----------------------------------------------------------------------------- shards
#
# `data encode` writes each split as shards: `<split>-00003-of-00012.array_record` holds examples
# [3 * size, 4 * size) of the split (size = data.encode_shard_size), with its LengthIndex
# (`.index.npz`) and, written last, its completion marker (`.done`, JSON). Which shards there
# are depends only on the split's length and the shard size, never on how many processes
# encoded them, so the records (and the training data read from them) are the same for any
# process count.


def shard_paths(path: str | epath.PathLike, num_shards: int) -> list[epath.Path]:
    """The shard files of the split whose records `path` names (`<dir>/<split>.array_record`)."""
    path = epath.Path(path)
    stem = path.name.removesuffix(".array_record")
    return [
        path.parent / f"{stem}-{k:05d}-of-{num_shards:05d}.array_record" for k in range(num_shards)
    ]


def marker_path(shard: epath.Path) -> epath.Path:
    """A shard's completion marker: written after its records and index, so its presence
    means the shard is whole."""
    return shard.parent / (shard.name + ".done")


def write_text_atomic(path: epath.Path, text: str) -> None:
    """`path` appears whole or not at all: a local file via a rename; a bucket object is
    atomic by itself."""
    if "://" in str(path):
        path.write_text(text)
        return
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def find_shards(path: str | epath.PathLike) -> list[epath.Path]:
    """The complete set of shard files of `path`'s split (one directory listing), or [] when
    there is none.

    Raises:
      FileNotFoundError: shards exist but not all of one set (an unfinished encode).
    """
    path = epath.Path(path)
    stem = path.name.removesuffix(".array_record")
    if not path.parent.exists():
        return []
    pattern = re.compile(rf"{re.escape(stem)}-(\d{{5}})-of-(\d{{5}})\.array_record")
    found: dict[int, set[int]] = {}
    for name in (p.name for p in path.parent.iterdir()):
        if m := pattern.fullmatch(name):
            found.setdefault(int(m[2]), set()).add(int(m[1]))
    if not found:
        return []
    if len(found) == 1:
        ((n, have),) = found.items()
        if have == set(range(n)):
            return shard_paths(path, n)
    sets = ", ".join(f"{len(have)} of {n}" for n, have in sorted(found.items()))
    raise FileNotFoundError(
        f"the encoded shards of {path} are incomplete ({sets} shard files): run "
        "`python -m tfx_jax data encode` to finish them."
    )


class EncodedSource:
    """Random access to the records written by `write_encoded` (decoded to `Record`s): one
    file, or the shards of a split read end to end (`find_shards`), their LengthIndexes
    concatenated in the same order."""

    def __init__(self, path: str | epath.PathLike | Sequence[str | epath.PathLike]):
        if isinstance(path, (list, tuple)):
            files = [epath.Path(p) for p in path]
            path = files[0] if files else epath.Path("<no files>")
        else:
            path = epath.Path(path)
            files = [path] if path.exists() else find_shards(path)
        if not files or not all(f.exists() for f in files):
            raise FileNotFoundError(
                f"encoded records {path} do not exist: run `python -m tfx_jax data encode` "
                "(it tokenizes the text and encodes the images with the trained VAE, once)."
            )
        self._path, self._files = path, files
        self._source = grain.sources.ArrayRecordDataSource([str(f) for f in files])
        self._index: LengthIndex | None = None
        if all(index_path(f).exists() for f in files):
            # Many shards in a bucket: their small index files load in parallel.
            with concurrent.futures.ThreadPoolExecutor(min(16, len(files))) as pool:
                parts = list(pool.map(LengthIndex.load, map(index_path, files)))
            index = LengthIndex.concat(parts)
            if len(index) == len(self._source):
                self._index = index
            else:
                log.warning("ignoring the indexes of %s: they do not match the records", path)

    def __len__(self) -> int:
        return len(self._source)

    def read_shells(self, indices: Sequence[int]) -> list[Record]:
        """Layout-only records (`shell`) of `indices`: from the index, or (records encoded before
        indexes existed) from the records' headers."""
        if self._index is not None:
            return [self._index.shell(i) for i in indices]
        out = []
        for data in self._source.__getitems__(indices):
            kind, lengths, latent_shape = header(data)
            out.append(shell(kind, lengths, latent_shape))
        return out

    def __getitem__(self, index: int) -> Record:
        return deserialize(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[Record]:
        """Batched read: ~4x cheaper per record than single reads from ArrayRecord."""
        return [deserialize(b) for b in self._source.__getitems__(indices)]

    def __repr__(self) -> str:
        if len(self._files) > 1:
            return f"EncodedSource({self._path}: {len(self._files)} shards)"
        return f"EncodedSource({self._path})"


class OnTheFlySource:
    """The records of `write_encoded`, made at read time instead (`data.latents=on_the_fly`).

    Tokenizes and VAE-encodes raw examples when the pipeline reads them, a block at a time
    (one `encode_images` call per block). Gives the same records as the precomputed file
    (latents rounded to float16 the same way; the VAE sees other batch sizes, so a latent may
    differ in its last float16 bit), so the two modes produce the same batches; it trades the
    encode stage's disk space and staleness for VAE compute in the input pipeline. Use it for
    data too large or too fresh to encode once.
    """

    def __init__(
        self,
        examples: Sequence[dict],
        encode_text: Callable[[str], list[int]],
        encode_images: Callable[[np.ndarray], np.ndarray] | None,
        latent_shape: tuple[int, int, int],
    ):
        self._examples = examples
        self._encode_text, self._encode_images = encode_text, encode_images
        self._latent_shape = latent_shape

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> Record:
        return self.__getitems__([index])[0]

    def read_shells(self, indices: Sequence[int]) -> list[Record]:
        """Layout-only records: the text tokenized, the images counted, no VAE."""
        out = []
        for i in indices:
            ex = self._examples[i]
            pieces = checked_pieces(ex["kind"], ex["text"], len(ex["images"]))
            lengths = [-p - 1 if isinstance(p, int) else len(self._encode_text(p)) for p in pieces]
            out.append(shell(KINDS.index(ex["kind"]), lengths, self._latent_shape))
        return out

    def __getitems__(self, indices: Sequence[int]) -> list[Record]:
        raw = [self._examples[i] for i in indices]
        return encode_block(raw, self._encode_text, self._encode_images, self._latent_shape)

    def __repr__(self) -> str:
        return f"OnTheFlySource({self._examples!r})"


def pool_encoder(factor: int, channels: int, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """A fixed, VAE-free image -> latent map: average-pool by `factor`, then a fixed random
    projection of RGB to `channels`. For tests and for runs before a VAE is trained."""
    proj = np.random.default_rng(seed).normal(size=(3, channels)).astype(np.float32)

    def encode(images_uint8: np.ndarray) -> np.ndarray:
        x = np.asarray(images_uint8, np.float32) / 127.5 - 1.0
        n, h, w, _ = x.shape
        x = x.reshape(n, h // factor, factor, w // factor, factor, 3).mean(axis=(2, 4))
        return x @ proj

    return encode
