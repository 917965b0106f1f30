"""Sources of files found under `data.path`: a directory (searched recursively) or a glob.

`path/train` and `path/validation` are the splits when the source allows split directories and
`path/train` exists; otherwise 5% of the files (by a hash of their path relative to the
directory) are the validation split.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from etils import epath
from tqdm.auto import tqdm

from tfx_jax.data.sources.base import DataConfigError, Source, check_split, safe_name

if TYPE_CHECKING:
    from tfx_jax.data.config import DataConfig, RunConfig

VALIDATION_PERCENT = 5  # without split directories: crc32(rel path) % 100 < this
_GLOB_CHARS = "*?["


class FileSource(Source):
    """A source whose examples are read from the files under `data.path`."""

    suffixes: ClassVar[tuple[str, ...]] = ()  # the files it reads (lower case)
    kind: ClassVar[str] = "files"  # what they are, for messages ("text files")
    split_dirs: ClassVar[bool] = False  # path/train and path/validation, if path/train exists
    filter_globs: ClassVar[bool] = True  # a glob's matches must have one of `suffixes` too

    def examples(self, cfg: RunConfig, files: Sequence[str]) -> Sequence[dict]:
        """Random access to the raw examples of `files`."""
        raise NotImplementedError

    def validate(self, cfg: RunConfig) -> None:
        if not cfg.data.path:
            raise DataConfigError(_needs_path(cfg.data))

    def splits(self, cfg: RunConfig) -> tuple[str, ...]:
        return tuple(s for s, files in self.files(cfg).items() if files)

    def build(self, cfg: RunConfig) -> None:
        files = self.files(cfg)
        if not files["train"]:
            raise FileNotFoundError(
                f"data.path={cfg.data.path!r} has no training {self.kind} "
                f"(looked for {', '.join(self.suffixes)} files)."
            )
        counts = ", ".join(f"{split} {len(f)} files" for split, f in files.items() if f)
        print(f"{self.name} source {cfg.data.path}: {counts}")

    def open_split(self, cfg: RunConfig, split: str) -> Sequence[dict]:
        files = self.files(cfg)
        check_split(cfg.data, split, {s: f for s, f in files.items() if f})
        return self.examples(cfg, files[split])

    def files(self, cfg: RunConfig) -> dict[str, list[str]]:
        """{"train": files, "validation": files} (as path strings): the split directories, or
        split by hash."""
        path = cfg.data.path
        if not path:
            raise ValueError(_needs_path(cfg.data))
        root = epath.Path(path)
        if self.split_dirs and not is_glob(path) and (root / "train").is_dir():
            listed = {
                split: [str(f) for f in find(str(root / split), self.suffixes)[1]]
                for split in ("train", "validation")
                if (root / split).is_dir()
            }
            return {"train": listed["train"], "validation": listed.get("validation", [])}
        suffixes = None if is_glob(path) and not self.filter_globs else self.suffixes
        base, files = find(path, suffixes)
        out: dict[str, list[str]] = {"train": [], "validation": []}
        for f in files:
            split = "validation" if is_validation(f.relative_to(base).as_posix()) else "train"
            out[split].append(str(f))
        return out


def _needs_path(d: DataConfig) -> str:
    return f"data.source={d.source} needs data.path (a directory or a glob)."


def path_name(path: str) -> str:
    """A readable file-name-safe stand-in for `path`: its last component ("imgs" for
    "gs://b/imgs/" and "imgs_.txt" for "imgs/*.txt")."""
    return safe_name(path.rstrip("/").rsplit("/", 1)[-1])


def walk(root: epath.Path, suffixes: tuple[str, ...]) -> list[epath.Path]:
    """Files under `root` (recursively) with one of `suffixes`, skipping hidden files and
    directories (".ipynb_checkpoints", macOS "._x.jpg" resource forks)."""
    files = []
    scheme = str(root).split("://", 1)[0] + "://" if "://" in str(root) else ""
    # A large tree (or a bucket) takes a while to list: a count and a rate after 2 s.
    bar = tqdm(desc=f"listing {root}", unit=" files", leave=False, delay=2)
    for directory, dirs, names in root.walk():
        if scheme and "://" not in str(directory):
            # epath's fsspec backend (gcsfs) yields "bucket/dir" without the scheme, which
            # would read as a local relative path: put the scheme back.
            directory = epath.Path(scheme + str(directory))
        dirs[:] = [name for name in dirs if not name.startswith(".")]  # Prunes the walk.
        if any(part.startswith(".") for part in directory.relative_to(root).parts):
            continue  # For backends whose walk ignores the pruning.
        found = [
            directory / name
            for name in names
            if not name.startswith(".") and name.lower().endswith(suffixes)
        ]
        files.extend(found)
        bar.update(len(found))
    bar.close()
    return files


def find(path: str, suffixes: tuple[str, ...] | None) -> tuple[epath.Path, list[epath.Path]]:
    """(base, files): files under the directory `path`, or matching the glob `path`
    (`*`, `?`, `[...]`; no `**`), sorted; base is what their split hashes are relative to.
    `suffixes` filters directory listings, and glob matches too when not None."""
    if is_glob(path):
        first = min(path.index(c) for c in _GLOB_CHARS if c in path)
        cut = path.rfind("/", 0, first)
        base = epath.Path(path[:cut] if cut > 0 else ("/" if cut == 0 else "."))
        pattern = path[cut + 1 :]
        files = [
            f
            for f in base.glob(pattern)
            if f.is_file() and (suffixes is None or f.name.lower().endswith(suffixes))
        ]
        return base, sorted(files, key=str)
    root = epath.Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist.")
    if not root.is_dir():
        return root.parent, [root]
    return root, sorted(walk(root, suffixes or ()), key=str)


def is_validation(relative: str) -> bool:
    """The deterministic 5% validation split: stable across machines, listing orders and
    added files (unlike shuffling with a seed)."""
    return zlib.crc32(relative.encode("utf-8")) % 100 < VALIDATION_PERCENT


def is_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)
