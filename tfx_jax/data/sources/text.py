"""source=text: UTF-8 .txt/.md files under `data.path` (a directory, searched recursively, or a
glob), cut into documents of up to ~2000 characters at blank lines; 5% of files (by hash) for
validation. A longer paragraph is one document: the input pipeline continues it across rows
(`data.overlong=split`), so no token is lost.

Counting a tree's documents reads every file once (`TextExamples`); the tokenizer's sample
(`Text.texts`) and a `data.max_examples` trial read only as many files as they need.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from etils import epath
from tqdm.auto import tqdm

from tfx_jax.data.sources.base import (
    RecordError,
    check_split,
    checked_index,
    crc_hex,
    register,
)
from tfx_jax.data.sources.files import FileSource, path_name

if TYPE_CHECKING:
    from tfx_jax.data.config import RunConfig

TEXT_SUFFIXES = (".txt", ".md")
DOCUMENT_CHARS = 2000  # paragraphs are grouped into documents up to this size


@register
class Text(FileSource):
    name = "text"
    suffixes = TEXT_SUFFIXES
    kind = "text files"
    filter_globs = False  # a glob keeps whatever it matches

    def source_id(self, cfg: RunConfig) -> str:
        return f"text_{path_name(cfg.data.path)}_{crc_hex(cfg.data.path)}"

    def examples(self, cfg: RunConfig, files: Sequence[str]) -> TextExamples:
        return TextExamples(files)

    def open_limited(self, cfg: RunConfig, split: str) -> Sequence[dict]:
        """The first `data.max_examples` documents, reading only the files that hold them."""
        if not cfg.data.max_examples:
            return self.open_split(cfg, split)
        files = self.files(cfg)
        check_split(cfg.data, split, {s: f for s, f in files.items() if f})
        return TextExamples(files[split], limit=cfg.data.max_examples)

    def texts(
        self, cfg: RunConfig, split: str, limit: int, seed: int = 0
    ) -> Iterator[str | RecordError]:
        """Documents of whole files drawn with `seed` until `limit` are read (the last file's
        cut), in file order; every document, in order, when the split has no more than `limit`.
        Documents per file are only known by reading it, so this samples files, not documents."""
        if cfg.data.max_examples:
            return super().texts(cfg, split, limit, seed)
        files = self.files(cfg)
        check_split(cfg.data, split, {s: f for s, f in files.items() if f})
        return _sampled_file_texts(files[split], limit, seed)

    def prompts(self, cfg: RunConfig, num: int, seed: int = 0) -> list[str]:
        return []  # Nothing to draw.


def cut_documents(text: str, max_chars: int = DOCUMENT_CHARS) -> list[str]:
    """`text` cut into documents at blank lines: consecutive paragraphs are joined (by a blank
    line) while the document stays within `max_chars`; a longer paragraph is a document of its
    own (cutting inside a paragraph would split sentences). Paragraph lines keep their
    indentation (code blocks in Markdown)."""
    paragraphs, lines = [], []
    for line in text.splitlines() + [""]:
        if line.strip():
            lines.append(line.rstrip())
        elif lines:
            paragraphs.append("\n".join(lines))
            lines = []
    documents, current = [], ""
    for paragraph in paragraphs:
        if current and len(current) + 2 + len(paragraph) > max_chars:
            documents.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        documents.append(current)
    return documents


class TextExamples:
    """Random-access text documents from UTF-8 files.

    The index (documents per file) is built on first use, reading each file once; documents
    are then cut again from their file on access, with the last few files' documents cached
    (the encode stage reads in order). A file that is not UTF-8 takes one slot whose
    `__getitem__` raises RecordError naming it (its cache entry is that message, a str), so it
    is skipped and counted like any bad record.
    """

    _CACHE_FILES = 8

    def __init__(self, files: Sequence[str], limit: int = 0):
        self._files = tuple(files)
        self._limit = limit  # > 0: only the first `limit` documents (files read until then)
        self._starts: np.ndarray | None = None  # first document index of each file, + total
        self._cache: collections.OrderedDict[int, list[str] | str] = collections.OrderedDict()

    def _documents(self, file_index: int) -> list[str] | str:
        """The file's documents, or (a str) why it cannot be read."""
        if file_index in self._cache:
            self._cache.move_to_end(file_index)
            return self._cache[file_index]
        path = epath.Path(self._files[file_index])
        try:
            documents: list[str] | str = cut_documents(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            documents = f"{path}: not UTF-8 text ({e})"
        self._cache[file_index] = documents
        if len(self._cache) > self._CACHE_FILES:
            self._cache.popitem(last=False)
        return documents

    def _index(self) -> np.ndarray:
        if self._starts is None:
            counts: list[int] = []
            total = 0
            n = len(self._files)
            bar = tqdm(total=n, desc="text files", unit=" files", leave=False, disable=n < 1000)
            for k in range(len(self._files)):
                docs = self._documents(k)
                counts.append(1 if isinstance(docs, str) else len(docs))
                total += counts[-1]
                bar.update()
                if self._limit and total >= self._limit:
                    break
            bar.close()
            self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        return self._starts

    def __len__(self) -> int:
        total = int(self._index()[-1])
        return min(total, self._limit) if self._limit else total

    def __getitem__(self, index: int) -> dict:
        starts = self._index()
        index = checked_index(index, len(self))
        file_index = int(np.searchsorted(starts, index, side="right")) - 1
        documents = self._documents(file_index)
        if isinstance(documents, str):
            raise RecordError(documents)
        return {"kind": "text", "text": documents[index - int(starts[file_index])], "images": []}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": collections.OrderedDict()}

    def __repr__(self) -> str:
        return f"TextExamples({len(self._files)} files)"


def _sampled_file_texts(files: Sequence[str], limit: int, seed: int) -> Iterator[str | RecordError]:
    """`Text.texts`: whole files in a seeded order until `limit` documents are read, then those
    documents in file order (all files read: exactly `TextExamples`' order). A file that is not
    UTF-8 gives one RecordError."""
    examples = TextExamples(files)
    order = np.random.default_rng(seed).permutation(len(files))
    chosen: dict[int, list[str] | str] = {}
    total = 0
    for k in tqdm(order.tolist(), desc="tokenizer sample", unit=" files", leave=False):
        if total >= limit:
            break
        docs = examples._documents(k)
        if not isinstance(docs, str):
            docs = docs[: limit - total]
        chosen[k] = docs
        total += 1 if isinstance(docs, str) else len(docs)
    for k in sorted(chosen):
        docs = chosen[k]
        if isinstance(docs, str):
            yield RecordError(docs)
        else:
            yield from docs
