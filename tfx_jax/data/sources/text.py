"""source=text: UTF-8 .txt/.md files under `data.path` (or matching a glob), cut into
documents of up to ~2000 characters at blank lines; 5% of files (by hash) for validation."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from etils import epath

from tfx_jax.data.sources.base import RecordError, checked_index, crc_hex, register
from tfx_jax.data.sources.files import FileSource, path_name

if TYPE_CHECKING:
    from tfx_jax.config import Config

TEXT_SUFFIXES = (".txt", ".md")
DOCUMENT_CHARS = 2000  # paragraphs are grouped into documents up to this size


@register
class Text(FileSource):
    name = "text"
    suffixes = TEXT_SUFFIXES
    kind = "text files"
    filter_globs = False  # a glob keeps whatever it matches

    def source_id(self, cfg: Config) -> str:
        return f"text_{path_name(cfg.data.path)}_{crc_hex(cfg.data.path)}"

    def examples(self, cfg: Config, files: Sequence[str]) -> TextExamples:
        return TextExamples(files)

    def prompts(self, cfg: Config, num: int, seed: int = 0) -> list[str]:
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

    def __init__(self, files: Sequence[str]):
        self._files = tuple(files)
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
            counts = [
                1 if isinstance(docs, str) else len(docs)
                for docs in map(self._documents, range(len(self._files)))
            ]
            self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        return self._starts

    def __len__(self) -> int:
        return int(self._index()[-1])

    def __getitem__(self, index: int) -> dict:
        starts = self._index()
        index = checked_index(index, int(starts[-1]))
        file_index = int(np.searchsorted(starts, index, side="right")) - 1
        documents = self._documents(file_index)
        if isinstance(documents, str):
            raise RecordError(documents)
        return {"kind": "text", "text": documents[index - int(starts[file_index])], "images": []}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": collections.OrderedDict()}

    def __repr__(self) -> str:
        return f"TextExamples({len(self._files)} files)"
