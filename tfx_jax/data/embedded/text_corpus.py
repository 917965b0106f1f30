"""Text-only documents from real English already on the machine: Python standard library docstrings.

Nothing may be downloaded at run time, and the interpreter always ships a few thousand
human-written docstrings. `documents()` walks the fixed, sorted `MODULES` list: each module's own
docstring, then (sorted by name) its public classes and functions defined in that module, and the
public methods defined on those classes. Each docstring becomes one document after
normalisation: doctest paragraphs (starting with ">>>") are dropped, whitespace inside a
paragraph collapses to single spaces, paragraphs are joined with "\\n", documents shorter than
`MIN_CHARS` are skipped, longer than `MAX_CHARS` are cut at a sentence (or word) boundary, and
exact duplicates are dropped.

The order is deterministic for a given Python version; docstrings differ slightly between
Python versions, so the corpus (and the text examples of the shapes dataset) is only
reproducible on the same minor version. Built datasets store the text, so this matters only
when regenerating.

A fixed ~10% of documents (by CRC32 of the text) form the "validation" slice, the rest "train",
so validation text never appears in training.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import warnings
import zlib

# Pure, side-effect-free stdlib modules with plenty of prose. Importing them reads only local
# files (no network, no GUI); `this`/`antigravity`/`turtle`/`tkinter` are deliberately absent.
MODULES = (
    "abc",
    "argparse",
    "ast",
    "asyncio.events",
    "asyncio.futures",
    "asyncio.locks",
    "asyncio.queues",
    "asyncio.streams",
    "asyncio.tasks",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookies",
    "http.server",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "locale",
    "logging",
    "mailbox",
    "math",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "plistlib",
    "poplib",
    "pprint",
    "pydoc",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "smtplib",
    "socketserver",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xmlrpc.client",
    "zipapp",
    "zipfile",
)
MIN_CHARS = 100
MAX_CHARS = 1200
SPLITS = ("train", "validation")
# The shapes dataset marks images with this literal; a text document must never contain it.
_RESERVED = "<image>"


def normalise(doc: str) -> str:
    """Cleans one docstring into a document (see the module docstring for the rules).

    Args:
      doc: a raw or `inspect.cleandoc`-ed docstring.

    Returns:
      The normalised text, possibly empty; at most `MAX_CHARS` characters.
    """
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        paragraph = " ".join(paragraph.split())
        if paragraph and not paragraph.startswith(">>>"):
            paragraphs.append(paragraph)
    text = "\n".join(paragraphs)
    if len(text) <= MAX_CHARS:
        return text
    cut = text[:MAX_CHARS]
    # Prefer ending on a full sentence; otherwise on a word boundary.
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    if end >= MAX_CHARS // 2:
        return cut[: end + 1]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def _own_docs(module_name: str) -> list[str]:
    """Docstrings of a module, its public classes/functions and their public methods."""
    module = importlib.import_module(module_name)
    # Accelerated modules define their functions in a C twin (heapq -> _heapq).
    owners = {module_name, "_" + module_name.rsplit(".", 1)[-1]}
    docs = [module.__doc__]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) not in owners:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        docs.append(obj.__doc__)
        if inspect.isclass(obj):
            for method_name, method in sorted(vars(obj).items()):
                if not method_name.startswith("_") and inspect.isroutine(method):
                    docs.append(getattr(method, "__doc__", None))
    return [d for d in docs if isinstance(d, str)]


@functools.cache
def _all_documents() -> tuple[str, ...]:
    seen: set[str] = set()
    out = []
    for module_name in MODULES:
        with warnings.catch_warnings():
            # Reading e.g. `typing.io` warns that it is deprecated; we only want its docstring.
            warnings.simplefilter("ignore", DeprecationWarning)
            docs = _own_docs(module_name)
        for doc in docs:
            text = normalise(doc)
            if len(text) >= MIN_CHARS and _RESERVED not in text and text not in seen:
                seen.add(text)
                out.append(text)
    return tuple(out)


def is_validation(text: str) -> bool:
    """Returns whether a document belongs to the validation slice (~10%, by CRC32)."""
    return zlib.crc32(text.encode("utf-8")) % 10 == 0


@functools.cache
def documents(split: str = "train") -> tuple[str, ...]:
    """Returns the text documents of one slice of the corpus, in deterministic order.

    Args:
      split: "train" (~90% of documents) or "validation" (the other ~10%).

    Returns:
      A tuple of non-empty normalised documents, each `MIN_CHARS`..`MAX_CHARS` characters.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    want_validation = split == "validation"
    return tuple(d for d in _all_documents() if is_validation(d) == want_validation)
