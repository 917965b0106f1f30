"""Streaming rolling diffusion: rows of an image as they arrive, as pictures.

Rolling generation (`sample.generate(..., on_row=...)`) finishes an image one patch row per
pass, top to bottom. `RowStream` is an `on_row` callback that records those rows and turns them
into frames (decoded by the VAE, grey below the rows received so far), an animated PNG and a
strip of frames — what `generate --image-mode rolling`, `eval` and the report show.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from etils import epath

from tfx_jax.generate.documents import latent_preview
from tfx_jax.models.vae import Codec


class RowStream:
    """The `on_row` callback of rolling generation as a recorder of rows arriving.

    Rolling mode finishes an image one patch row per pass, top to bottom, and hands each row to
    `on_row(prompt_index, row, latent_row)` at once. A RowStream keeps those rows (per prompt and
    per generated image, in arrival order) and turns them into what a viewer shows after each
    pass: `frames` decodes the rows received so far (rows not yet generated are zero latents, the
    latent mean) and shows their pixel rows, grey below; `write` saves every image's frames as an
    animated PNG and as one strip of frames side by side.

        stream = RowStream()
        results = generate(cfg, params, tok, prompts, options, vae=vae, on_row=stream)
        stream.write(out_dir, vae)       # stream_<prompt>_<image>.png (APNG) and ..._strip.png

    A live display passes its own callback (`RowStream(on_row=show)`, called after each row is
    recorded) and calls `frames(key, vae)[-1]` there for the latest picture.
    """

    GAP = 2  # pixels between the frames of a strip

    def __init__(self, on_row: Callable[[int, int, np.ndarray], None] | None = None):
        self.on_row = on_row
        self.rows: dict[tuple[int, int], list[np.ndarray]] = {}  # (prompt, image) -> rows
        self.arrivals: list[tuple[int, int, int]] = []  # (prompt, image, row) in arrival order
        self._image: dict[int, int] = {}

    def __call__(self, prompt_index: int, row: int, latent_row: np.ndarray) -> None:
        if row == 0:  # a prompt's next image starts
            self._image[prompt_index] = self._image.get(prompt_index, -1) + 1
        key = (prompt_index, self._image[prompt_index])
        self.rows.setdefault(key, []).append(np.array(latent_row, np.float32))
        self.arrivals.append((*key, row))
        if self.on_row is not None:
            self.on_row(prompt_index, row, latent_row)

    def frames(self, key: tuple[int, int], vae: Codec | None = None) -> list[np.ndarray]:
        """uint8 [H, W, 3] pictures of image `key` after each of its rows so far.

        Each frame decodes the rows received by then (VAE, or `latent_preview` without one) and
        keeps the pixel rows they cover; a decoder's receptive field blurs only the edge row.
        """
        rows = self.rows[key]
        p, w, C = rows[0].shape
        g = w // p  # square latent grids: as many patch rows as patch columns
        lat = np.zeros((len(rows), g * p, w, C), np.float32)
        for k in range(len(rows)):
            lat[k, : (k + 1) * p] = np.concatenate(rows[: k + 1])
        if vae is not None:
            pix = np.array(Codec(*vae).decode(jnp.asarray(lat)))  # writable: rows get greyed
        else:
            pix = np.stack([latent_preview(x) for x in lat])
        per_row = pix.shape[1] // g
        for k in range(len(rows)):
            pix[k, (k + 1) * per_row :] = 128
        return list(pix)

    def write(self, out_dir: str | epath.PathLike, vae: Codec | None = None) -> list[epath.Path]:
        """Writes `stream_<prompt>_<image>.png` (an animated PNG, one frame per row) and
        `stream_<prompt>_<image>_strip.png` (the frames left to right) for every image."""
        from PIL import Image

        out = epath.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for b, i in sorted(self.rows):
            frames = self.frames((b, i), vae)
            ims = [Image.fromarray(f) for f in frames]
            H, W = frames[0].shape[:2]
            strip = np.full((H, len(frames) * (W + self.GAP) - self.GAP, 3), 255, np.uint8)
            for k, f in enumerate(frames):
                strip[:, k * (W + self.GAP) : k * (W + self.GAP) + W] = f
            anim, flat = out / f"stream_{b}_{i}.png", out / f"stream_{b}_{i}_strip.png"
            with anim.open("wb") as fh:
                ims[0].save(
                    fh,
                    format="PNG",
                    save_all=True,
                    append_images=ims[1:],
                    duration=[250] * (len(ims) - 1) + [1500],  # hold the finished image
                    loop=0,
                )
            with flat.open("wb") as fh:
                Image.fromarray(strip).save(fh, format="PNG")
            paths += [anim, flat]
        return paths
