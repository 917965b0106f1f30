"""One way to turn an image into model input: `prepare_image`, used by every source that reads
images (folder, tfds) and by `generate --image`, so the model is given images at generation
exactly as it was trained on them.

    mode    -> RGB. 16-bit grey ("I;16", "I;16B", ..., and "I", which is how 16-bit grey and
               32-bit TIFFs load) is scaled from 0..65535 to 0..255 (Pillow's own conversion
               clips at 255, so nearly every pixel would become white); float ("F") from 0..1
               (or clipped to 0..255 if it holds larger values); bilevel and grey are repeated
               into R, G and B; CMYK, YCbCr, ... by Pillow. Transparency (RGBA, LA, PA, a
               palette with a transparent index, premultiplied alpha) is composited onto white:
               transparent areas of logos and scans are meant to be seen on a light page, and
               dropping alpha would show whatever colour the encoder left there, often black.
    size    -> an image smaller than `min_size` on its shorter side is refused with
               `ImageTooSmallError` (upscaling a 1 x 1 image gives a flat square, not a picture
               of anything); sources count it as "too small".
    crop    -> the centred square (keeps the aspect ratio and fills the frame; no padding, no
               squashing).
    resize  -> S x S with Pillow's Lanczos filter (anti-aliased when downscaling).
"""

from __future__ import annotations

import io

import numpy as np
from etils import epath
from PIL import Image, ImageOps

from tfx_jax.data.sources.base import ImageTooSmallError, RecordError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BACKGROUND = (255, 255, 255)  # what transparent pixels become
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def to_8bit(array: np.ndarray, full_scale: float) -> np.ndarray:
    """Numbers in 0..full_scale -> uint8 0..255, rounded (out-of-range values are clipped)."""
    scaled = np.nan_to_num(np.asarray(array, np.float64)) * (255.0 / full_scale)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB mode (see the module docstring for each mode)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT:
        image = Image.fromarray(to_8bit(np.asarray(image), 65535.0))
    elif mode == "F":
        values = np.asarray(image)
        peak = float(np.nanmax(values)) if values.size else 0.0
        image = Image.fromarray(to_8bit(values, 1.0 if peak <= 1.0 else 255.0))
    if image.mode in _ALPHA or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "1":
        image = image.convert("L")
    return image.convert("RGB")


def prepare_image(
    image: Image.Image, size: int, *, min_size: int = 1, name: str = "the image"
) -> np.ndarray:
    """`image` as the model sees it: [size, size, 3] uint8 (module docstring: mode, size check,
    centre crop, Lanczos resize).

    Args:
      image: any Pillow image.
      size: S, the side of the result (`data.image_size`).
      min_size: the smallest shorter side accepted (`data.min_image_size`, resolved).
      name: what to call the image in errors (its file or record).

    Raises:
      ImageTooSmallError: the shorter side is below `min_size`.
    """
    width, height = image.size
    check_size(width, height, size, min_size, name)
    image = to_rgb(image)
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        # crop() first: resize(box=...) would let the filter read pixels outside the square.
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.array(image, np.uint8)


def check_size(width: int, height: int, size: int, min_size: int, name: str) -> None:
    """ImageTooSmallError unless the shorter side of a width x height image is >= min_size."""
    if min(width, height) < min_size:
        raise ImageTooSmallError(
            f"{name}: {width}x{height} pixels is smaller than data.min_image_size={min_size} on "
            f"a side (it would be upscaled to {size}x{size}); lower data.min_image_size to use "
            "such images"
        )


def array_to_image(array: np.ndarray) -> Image.Image:
    """[H, W] or [H, W, 1 | 2 | 3 | 4] uint8 (uint16 and bool too) -> a Pillow image (L, LA,
    RGB or RGBA); 16-bit values are scaled to 8 bits like 16-bit files."""
    array = np.asarray(array)
    if array.dtype == np.uint16:
        array = to_8bit(array, 65535.0)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or uint16 image, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise ValueError(f"expected an [H, W, 1|2|3|4] image, got shape {array.shape}")
    return Image.fromarray(array)


def read_image(path: str | epath.PathLike, size: int, min_size: int = 1) -> np.ndarray:
    """The image file at `path` through `prepare_image` (first frame of a GIF; EXIF orientation
    applied, since phone JPEGs store pixels sideways).

    Raises:
      ImageTooSmallError: smaller than `min_size` on a side.
      RecordError: the file cannot be read or decoded (naming it).
    """
    path = epath.Path(path)
    try:
        image = Image.open(io.BytesIO(path.read_bytes()))
        check_size(*image.size, size, min_size, str(path))
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster.
        image = ImageOps.exif_transpose(image)
        return prepare_image(image, size, min_size=1, name=str(path))
    except RecordError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...).
        raise RecordError(f"{path}: cannot decode the image ({type(e).__name__}: {e})") from e
