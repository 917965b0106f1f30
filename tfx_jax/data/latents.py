"""Image latents precomputed once into ArrayRecord, aligned with a source by record index.

The trainer uses the VAE frozen; encoding every image once (instead of every epoch in the input
pipeline) keeps the hot loop free of VAE compute. Record i holds the latents of all images of
example i as one float16 array [n_images, h, w, C] (n_images may be 0), serialised with
`np.save`. Paths may be local or remote (`gs://…`) — ArrayRecord and etils handle both.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath


def _to_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def write_latents(
    path: str | epath.PathLike,
    examples: Sequence[dict],
    encode: Callable[[np.ndarray], np.ndarray],
    latent_shape: tuple[int, int, int],
    batch_size: int = 256,
    progress: bool = True,
) -> int:
    """Encodes every image of `examples` and writes one latent record per example.

    Args:
      path: output ArrayRecord file (written to `path.tmp` then renamed, so a crash never leaves
        a file that looks complete).
      examples: random-access records with "images" (lists of uint8 [H, W, 3]).
      encode: uint8 images [N, H, W, 3] -> latents [N, h, w, C].
      latent_shape: (h, w, C), for examples without images.
      batch_size: images per `encode` call.

    Returns:
      The number of images encoded.
    """
    from tqdm.auto import tqdm

    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    pending: list[tuple[int, int]] = []  # (example index, number of its images) not yet written
    images: list[np.ndarray] = []
    total = 0

    def flush():
        nonlocal images, pending
        lat = np.asarray(encode(np.stack(images)), np.float16) if images else None
        offset = 0
        for _, n in pending:
            record = lat[offset : offset + n] if n else np.zeros((0, *latent_shape), np.float16)
            writer.write(_to_bytes(record))
            offset += n
        images, pending = [], []

    for i in tqdm(range(len(examples)), desc=f"latents → {path.name}", disable=not progress):
        ims = list(examples[i]["images"])
        pending.append((i, len(ims)))
        images.extend(ims)
        total += len(ims)
        if len(images) >= batch_size:
            flush()
    flush()
    writer.close()
    tmp.replace(path)  # atomic; overwrites latents made by an older VAE
    return total


class LatentSource:
    """Random access to the latents written by `write_latents` (float32 on read)."""

    def __init__(self, path: str | epath.PathLike):
        path = epath.Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"latent file {path} does not exist: run `python -m tfx_jax data latents` "
                "(it encodes the dataset's images with the trained VAE)."
            )
        self._path = path
        self._source = grain.sources.ArrayRecordDataSource([str(path)])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.load(io.BytesIO(self._source[index]), allow_pickle=False).astype(np.float32)

    def __repr__(self) -> str:
        return f"LatentSource({self._path})"


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
