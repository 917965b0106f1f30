"""What every data source is (`Source`), the registry of sources by name, and their errors.

A source is one module of this package that defines a `Source` subclass under `@register`;
`get(name)` (or `of(cfg)`, for `cfg.data.source`) returns its instance. Nothing outside this
package knows a source by name: the trainer, the stages and the config checks ask the source.

Most sources have files: per split, a random-access sequence of *raw examples*

    {"kind": "caption" | "interleaved" | "text",
     "text": str,                       # interleaved text marks images with "<image>"
     "images": list of uint8 [S, S, 3]} # S = data.image_size; [] for text documents

which the `data encode` stage turns, once, into token ids and VAE latents
(`tfx_jax.data.encoded`). `__getitem__` raises `RecordError` (naming the record or file) for an
example that cannot be used (`ImageTooSmallError` for an image below `data.min_image_size`);
every stage that reads examples (tokenizer, VAE, encode) skips and counts it by its `reason`,
or fails, by `data.on_error`: an example that cannot be used contributes nothing anywhere.
The stages read `open_limited` (the first `data.max_examples`, for trials) and the tokenizer
`texts` (a bounded, seeded sample, read through the same examples: the same ones refused).
A source may instead make packed batches itself (`makes_batches`): then no
tokenizer, VAE or encoded records are made for it. A source may have a judge (`judge`, a
`tfx_jax.data.judging.Judge`) that reads generated images and captions back: evaluation asks
it, and never knows the source's grammar itself.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from tfx_jax.data.config import DataConfig, DataConfigError
from tfx_jax.data.judging import Judge

if TYPE_CHECKING:
    from tfx_jax.data.config import RunConfig

SPLITS = ("train", "validation", "heldout")


class RecordError(ValueError):
    """An example that cannot be used (the message names the record or file).

    `reason` is what the stages count it as ("unreadable", "too small"). The CLI prints any
    RecordError (subclasses included) as one "data error: ..." line with exit code 2.
    """

    reason: ClassVar[str] = "unreadable"


class ImageTooSmallError(RecordError):
    """An image smaller than `data.min_image_size` on a side: upscaling it would train on a
    blur, so it is skipped and counted (or stops the stage, by `data.on_error`)."""

    reason: ClassVar[str] = "too small"


class DataLossError(RecordError):
    """Too much of a split cannot be used, or none of it can (every example over-long,
    unreadable, or the split empty): the message says how many, why, and the settings that fix
    it. Raised by the encode stage and by the input pipeline instead of training on what is left
    (or waiting forever for a batch that cannot come)."""

    reason: ClassVar[str] = "lost"


class Source:
    """A data source: where the examples of `data.source = name` come from.

    Subclasses set `name` (and `has_images`, `makes_batches` where they differ) and implement
    what applies to them; the defaults below say what a source without that ability does.
    """

    name: ClassVar[str] = ""
    # Examples have images, so they need the VAE and latents (and `vae.*` must fit the images).
    has_images: ClassVar[bool] = False
    # The source makes packed batches itself (`batches`): no files, tokenizer, VAE or records.
    makes_batches: ClassVar[bool] = False
    # The iterator contract: every batch iterator of a source (its own `batches`, or the packed
    # pipeline over its records) plans GLOBAL batches and keeps this process's rows, so its
    # saved position is the same in every process and resumes on any process count.
    position_is_global: ClassVar[bool] = True
    # A source made of other sources (a mixture): `components` lists them, and each stage and
    # the pipeline run per component. A plain source is its own records (`components` None).
    composite: ClassVar[bool] = False

    def components(self, cfg: RunConfig) -> list[tuple[str, float, RunConfig]] | None:
        """(name, weight, config of that source alone) per component of a composite source;
        None for a source that is its own records."""
        return None

    def bind(self, cfg: RunConfig) -> Source:
        """This source for `cfg` (`of(cfg)`): itself, unless its flags depend on the config."""
        return self

    def validate(self, cfg: RunConfig) -> None:
        """Checks the `data.*` settings this source needs, cheaply (no files are read).

        Raises:
          DataConfigError: naming the setting and what to do.
        """

    def source_id(self, cfg: RunConfig) -> str:
        """A file-name-safe name for the source's settings (the artifact directory's name).

        Everything that changes the examples is in it (directly or through a short hash), so a
        tokenizer or encoded records made for other settings are never reused by mistake.
        """
        raise no_files(cfg.data)

    def splits(self, cfg: RunConfig) -> tuple[str, ...]:
        """The splits this source has, among `SPLITS` (always "train"; "validation" if any)."""
        raise no_files(cfg.data)

    def build(self, cfg: RunConfig) -> None:
        """Makes the source readable (renders generated data; for data that must exist,
        checks that it does and says what to run if not)."""
        raise no_files(cfg.data)

    def open_split(self, cfg: RunConfig, split: str) -> Sequence[dict]:
        """Random access to the raw examples of `split` (see the module docstring)."""
        raise no_files(cfg.data)

    def open_limited(self, cfg: RunConfig, split: str) -> Sequence[dict]:
        """`open_split` cut to its first `data.max_examples` (all when 0): what every stage
        reads, so a trial on a large source bounds the tokenizer, VAE and encode alike."""
        return first(self.open_split(cfg, split), cfg.data.max_examples)

    def texts(
        self, cfg: RunConfig, split: str, limit: int, seed: int = 0
    ) -> Iterator[str | RecordError]:
        """The texts of up to `limit` examples of `split` (of its first `data.max_examples`),
        for the tokenizer: all of them in order when there are no more than `limit`, else a
        sample seeded by `seed` (`sample_indices`, read in index order).

        An example that cannot be used comes as its `RecordError` (not raised), so the caller
        counts it or stops, by `data.on_error`. The default reads whole examples, images
        decoded, so an example counts exactly when encode and the VAE can use it (the sample is
        bounded); a source may override it to read texts alone where it has no images.
        """
        return sampled_texts(_Texts(self.open_limited(cfg, split)), limit, seed)

    def prompts(self, cfg: RunConfig, num: int, seed: int = 0) -> list[str]:
        """Captions to draw sample images for during eval: by default the captions of the first
        validation (else train) examples, cycled up to `num` (the same every eval, so samples
        are comparable across steps)."""
        split = "validation" if "validation" in self.splits(cfg) else "train"
        return cycle(first_captions(self.open_split(cfg, split), num), num)

    def batches(self, cfg: RunConfig, split: str) -> Iterator[dict[str, np.ndarray]]:
        """This process's packed batches of `split` (only for `makes_batches` sources): a
        checkpointable iterator (`get_state`/`set_state`, like Grain's)."""
        raise NotImplementedError(f"data.source={self.name} reads files; it makes no batches")

    def judge(self, cfg: RunConfig) -> Judge | None:
        """What reads generated images and captions back against this source's captions
        (`tfx_jax.data.judging.Judge`); None: the source has no judge, so its samples are drawn
        and captioned but not scored."""
        return None

    def describe(self, cfg: RunConfig) -> str:
        """The source in a few words, for a run's header (`eval.json`'s config, the report)."""
        return self.name


_REGISTRY: dict[str, Source] = {}
_S = TypeVar("_S", bound=type[Source])


def register(cls: _S) -> _S:
    """Class decorator: makes `cls()` the source called `cls.name`."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"source class {cls.__name__}: name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls()
    return cls


def names() -> tuple[str, ...]:
    """The registered sources' names."""
    return tuple(sorted(_REGISTRY))


def get(name: str) -> Source:
    """The source called `name`, or DataConfigError naming the valid choices."""
    if name not in _REGISTRY:
        raise DataConfigError(f"data.source={name!r}: use one of {' | '.join(names())}.")
    return _REGISTRY[name]


def of(cfg: RunConfig) -> Source:
    """The source `cfg.data.source` names (bound to `cfg` where its abilities depend on it: a
    mixture has images, and a judge, when one of its components does)."""
    return get(cfg.data.source).bind(cfg)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the sources.
# ---------------------------------------------------------------------------------------------


def no_files(d: DataConfig) -> ValueError:
    with_files = [name for name in names() if not _REGISTRY[name].makes_batches]
    listing = ", ".join(with_files[:-1]) + f" or {with_files[-1]}" if with_files else "none"
    return ValueError(f"data.source={d.source!r} has no files (use {listing}).")


def check_split(d: DataConfig, split: str, available: dict[str, Any]) -> None:
    if split not in available:
        raise ValueError(
            f"data.source={d.source} has no split {split!r}; it has {tuple(available)}."
        )


def crc_hex(text: str) -> str:
    return f"{zlib.crc32(text.encode('utf-8')):08x}"


def safe_name(text: str) -> str:
    """`text` with every character outside [A-Za-z0-9._-] replaced by "_"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "data"


def cycle(items: list[str], num: int) -> list[str]:
    return [items[i % len(items)] for i in range(num)] if items else []


def first_captions(source: Sequence[dict], num: int) -> list[str]:
    """Captions of the first `num` readable examples (at most 4 * num are tried)."""
    captions = []
    for index in range(min(len(source), 4 * num)):
        if len(captions) == num:
            break
        try:
            captions.append(source[index]["text"])
        except RecordError:
            continue
    return captions


def first(examples: Sequence[dict], n: int) -> Sequence[dict]:
    """The first `n` of `examples` (all of them when n is 0 or not smaller), random access."""
    return examples if not n or n >= len(examples) else _First(examples, n)


class _First:
    def __init__(self, examples: Sequence[dict], n: int):
        self._examples, self._n = examples, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict:
        return self._examples[checked_index(index, self._n)]

    def __repr__(self) -> str:
        return f"{self._examples!r}[:{self._n}]"


def sample_indices(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """0..n-1 when n <= limit (so a source within the limit is read whole, in order: the same
    texts as before there was a limit); else `limit` distinct indices drawn with `seed`,
    sorted (sequential reads are the cheap ones in ArrayRecord and on disk)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def sampled_texts(texts: Sequence[str], limit: int, seed: int = 0) -> Iterator[str | RecordError]:
    """`texts[i]` for the `sample_indices`; an index whose read raises RecordError gives the
    error instead (`Source.texts`)."""
    for i in sample_indices(len(texts), limit, seed).tolist():
        try:
            yield texts[i]
        except RecordError as e:
            yield e


class _Texts:
    """The "text" of each example of a raw-example sequence (reads the whole example)."""

    def __init__(self, examples: Sequence[dict]):
        self._examples = examples

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> str:
        return self._examples[index]["text"]


def checked_index(index: int, length: int) -> int:
    """`index` as a non-negative int, or IndexError (which ends iteration over a source)."""
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for {length} examples")
    return index
