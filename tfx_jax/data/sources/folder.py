"""source=folder: images under `data.path` with a same-name .txt caption beside each.

`path/train` and `path/validation` if `path/train` exists, else 5% of files (by a hash of their
relative path) for validation. Images go through `images.prepare_image` (RGB, alpha on white,
centre crop, resize to `data.image_size`). An image that cannot be decoded, is smaller than
`data.min_image_size` or has no caption is skipped and counted (or stops the stage, by
`data.on_error`), caption included: it contributes nothing anywhere, the tokenizer included.
`data build` also reports caption files that have no image beside them (they are not used).
The tokenizer's text (`Source.texts`: a bounded sample) is read through the same examples, each
image decoded as training decodes it, so exactly the same images are refused there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from etils import epath

from tfx_jax.data.sources.base import (
    RecordError,
    checked_index,
    crc_hex,
    register,
)
from tfx_jax.data.sources.files import FileSource, is_glob, path_name, walk
from tfx_jax.data.sources.images import IMAGE_SUFFIXES, read_image

if TYPE_CHECKING:
    from tfx_jax.data.config import RunConfig

log = logging.getLogger(__name__)
CAPTION_SUFFIX = ".txt"


@dataclasses.dataclass
class FolderStats:
    """What `data build` reports about a folder: images per split, images without a caption
    file (skipped when read) and caption files without an image (never read)."""

    images: dict[str, int]
    uncaptioned: list[str]
    orphan_captions: list[str]

    def summary(self, path: str) -> str:
        counts = ", ".join(f"{split} {n} images" for split, n in self.images.items() if n)
        lines = [f"folder source {path}: {counts}"]
        if self.uncaptioned:
            lines.append(
                f"  {len(self.uncaptioned)} images without a {CAPTION_SUFFIX} caption beside "
                f"them are skipped (counted when encoded), e.g. {_first(self.uncaptioned)}"
            )
        if self.orphan_captions:
            lines.append(
                f"  {len(self.orphan_captions)} caption files have no image beside them and are "
                f"not used, e.g. {_first(self.orphan_captions)}"
            )
        return "\n".join(lines)


def _first(paths: list[str], n: int = 3) -> str:
    return ", ".join(paths[:n]) + (", ..." if len(paths) > n else "")


@register
class Folder(FileSource):
    name = "folder"
    has_images = True
    suffixes = IMAGE_SUFFIXES
    kind = "images with .txt captions"
    split_dirs = True

    def source_id(self, cfg: RunConfig) -> str:
        d = cfg.data
        return f"folder_{path_name(d.path)}_{crc_hex(d.path)}_{d.image_size}px"

    def build(self, cfg: RunConfig) -> None:
        files = self.files(cfg)
        if not files["train"]:
            super().build(cfg)  # says what is missing
        stats = self.stats(cfg, files)
        print(stats.summary(cfg.data.path))
        if stats.orphan_captions:
            log.warning("caption files without an image: %s", stats.orphan_captions)

    def stats(self, cfg: RunConfig, files: dict[str, list[str]] | None = None) -> FolderStats:
        """Counts images per split, images without captions and captions without images (only
        for a directory: the captions of a glob's images are looked up beside them)."""
        files = files if files is not None else self.files(cfg)
        images = [f for split_files in files.values() for f in split_files]
        captions = self._caption_files(cfg.data.path)
        counts = {split: len(f) for split, f in files.items()}
        if captions is None:
            return FolderStats(images=counts, uncaptioned=[], orphan_captions=[])
        stems = {_stem(c) for c in captions}
        image_stems = {_stem(f) for f in images}
        return FolderStats(
            images=counts,
            uncaptioned=[f for f in images if _stem(f) not in stems],
            orphan_captions=[c for c in captions if _stem(c) not in image_stems],
        )

    def _caption_files(self, path: str) -> list[str] | None:
        """The .txt files under the directory `path` (None for a glob or a single file)."""
        if is_glob(path):
            return None
        root = epath.Path(path)
        if not root.is_dir():
            return None
        roots = [root]
        if (root / "train").is_dir():
            roots = [root / s for s in ("train", "validation") if (root / s).is_dir()]
        return sorted(
            str(f)
            for r in roots
            for f in walk(r, (CAPTION_SUFFIX,))
            if f.name.endswith(CAPTION_SUFFIX)
        )

    def examples(self, cfg: RunConfig, files: Sequence[str]) -> FolderExamples:
        return FolderExamples(files, cfg.data.image_size, cfg.data.min_image_side)


def _stem(path: str) -> str:
    """The path without its suffix ("a/b.png" -> "a/b"): an image and its caption share it."""
    return str(epath.Path(path).with_suffix(""))


class FolderExamples:
    """Random-access caption examples from image files with same-name .txt captions."""

    def __init__(self, files: Sequence[str], image_size: int, min_image_size: int = 1):
        self._files = tuple(files)
        self._image_size = image_size
        self._min_image_size = min_image_size

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict:
        """Example `index`, or RecordError: every reader (tokenizer, VAE, encode) gets the same
        answer, so an image that cannot be used gives nothing anywhere, not even its caption."""
        path = epath.Path(self._files[checked_index(index, len(self))])
        caption = read_caption(path)
        image = read_image(path, self._image_size, self._min_image_size)
        return {"kind": "caption", "text": caption, "images": [image]}

    def __repr__(self) -> str:
        return f"FolderExamples({len(self)} images)"


def read_caption(image_path: epath.Path) -> str:
    """The stripped text of the .txt file beside `image_path`, or RecordError."""
    path = image_path.with_suffix(CAPTION_SUFFIX)
    try:
        caption = path.read_bytes().decode("utf-8-sig").strip()
    except FileNotFoundError:
        raise RecordError(f"{image_path}: no caption file {path.name} beside it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: cannot read the caption ({e})") from e
    if not caption:
        raise RecordError(f"{image_path}: its caption file {path.name} is empty")
    return caption
