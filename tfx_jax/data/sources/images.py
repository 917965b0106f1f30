"""Images as every source gives them: RGB (grey repeated, alpha composited onto white),
centre-cropped to a square and resized to S x S with Pillow's Lanczos filter."""

from __future__ import annotations

import io

import numpy as np
from etils import epath
from PIL import Image, ImageOps

from tfx_jax.data.sources.base import RecordError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def to_rgb_image(image: Image.Image) -> Image.Image:
    """`image` in RGB mode: grey repeated into RGB; alpha composited onto white (transparent
    areas of logos and scans are meant to be seen on a light page; dropping alpha would show
    whatever colour the encoder left there, often black)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def square_resize(image: Image.Image, size: int) -> np.ndarray:
    """The centred square crop of `image` resized to [size, size, 3] uint8.

    Cropping (rather than padding or squashing) keeps the aspect ratio and fills the frame;
    Lanczos anti-aliases when downscaling (Pillow widens the kernel by the scale factor).
    """
    image = to_rgb_image(image)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    if width != height:
        # crop() first: resize(box=...) would let the filter read pixels outside the square.
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.array(image, np.uint8)


def array_to_image(array: np.ndarray) -> Image.Image:
    """uint8 [H, W] or [H, W, 1 | 2 | 3 | 4] -> a Pillow image (L, LA, RGB or RGBA)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise ValueError(f"expected an [H, W, 1|2|3|4] image, got shape {array.shape}")
    return Image.fromarray(array)


def read_image(path: epath.Path, size: int) -> np.ndarray:
    """The image file at `path` as [size, size, 3] uint8 (first frame of a GIF; EXIF
    orientation applied, since phone JPEGs store pixels sideways), or RecordError."""
    try:
        image = Image.open(io.BytesIO(path.read_bytes()))
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster.
        image = ImageOps.exif_transpose(image)
        return square_resize(image, size)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...).
        raise RecordError(f"{path}: cannot decode the image ({type(e).__name__}: {e})") from e
