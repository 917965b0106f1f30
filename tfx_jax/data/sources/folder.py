"""source=folder: images under `data.path` with a same-name .txt caption beside each.

`path/train` and `path/validation` if `path/train` exists, else 5% of files (by a hash of their
relative path) for validation. Images are made RGB, centre-cropped and resized to
`data.image_size` (`images.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from etils import epath

from tfx_jax.data.sources.base import RecordError, checked_index, crc_hex, register
from tfx_jax.data.sources.files import FileSource, path_name
from tfx_jax.data.sources.images import IMAGE_SUFFIXES, read_image

if TYPE_CHECKING:
    from tfx_jax.config import Config


@register
class Folder(FileSource):
    name = "folder"
    has_images = True
    suffixes = IMAGE_SUFFIXES
    kind = "images with .txt captions"
    split_dirs = True

    def source_id(self, cfg: Config) -> str:
        d = cfg.data
        return f"folder_{path_name(d.path)}_{crc_hex(d.path)}_{d.image_size}px"

    def examples(self, cfg: Config, files: Sequence[str]) -> FolderExamples:
        return FolderExamples(files, cfg.data.image_size)


class FolderExamples:
    """Random-access caption examples from image files with same-name .txt captions."""

    def __init__(self, files: Sequence[str], image_size: int):
        self._files = tuple(files)
        self._image_size = image_size

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict:
        path = epath.Path(self._files[checked_index(index, len(self))])
        return {
            "kind": "caption",
            "text": read_caption(path),
            "images": [read_image(path, self._image_size)],
        }

    def text(self, index: int) -> str:
        """Example `index`'s caption alone, without decoding its image (for the tokenizer)."""
        return read_caption(epath.Path(self._files[checked_index(index, len(self))]))

    def __repr__(self) -> str:
        return f"FolderExamples({len(self)} images)"


def read_caption(image_path: epath.Path) -> str:
    """The stripped text of the .txt file beside `image_path`, or RecordError."""
    path = image_path.with_suffix(".txt")
    try:
        caption = path.read_bytes().decode("utf-8-sig").strip()
    except FileNotFoundError:
        raise RecordError(f"{image_path}: no caption file {path.name} beside it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: cannot read the caption ({e})") from e
    if not caption:
        raise RecordError(f"{image_path}: its caption file {path.name} is empty")
    return caption
