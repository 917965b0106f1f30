"""Where examples come from: one interface over every `data.source` that has files.

Every source gives, per split, a random-access sequence of *raw examples*

    {"kind": "caption" | "interleaved" | "text",
     "text": str,                       # interleaved text marks images with "<image>"
     "images": list of uint8 [S, S, 3]} # S = data.image_size; [] for text documents

which the `data encode` stage turns, once, into token ids and VAE latents
(`tfx_jax.data.records`). `__getitem__` raises `RecordError` (naming the record or file) for
an example that cannot be decoded; the encode stage skips and counts it, or fails, by
`data.on_error`.

Artifacts made from a source (tokenizer, VAE, encoded records) live in `artifact_dir(cfg)`, a
directory named after the source's settings, so two sources never share a stale tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

from etils import epath

from tfx_jax.config import IMAGE_SOURCES, Config

SPLITS = ("train", "validation", "heldout")


class RecordError(ValueError):
    """An example that cannot be decoded (the message names the record or file)."""


def has_images(cfg: Config) -> bool:
    """Whether the source has images (and so needs the VAE and latents)."""
    return cfg.data.source in IMAGE_SOURCES


def source_id(cfg: Config) -> str:
    """A file-name-safe name for the source's settings (the artifact directory's name)."""
    d = cfg.data
    if d.source == "shapes":
        return f"shapes_{d.tfds_config}_{d.image_size}px"
    raise ValueError(f"data.source={d.source!r} has no files (use shapes, tfds, folder or text).")


def artifact_dir(cfg: Config) -> epath.Path:
    """<data_dir>/<source_id>: tokenizer.model, vae/, encoded/<split>.array_record."""
    return epath.Path(cfg.data.data_dir) / source_id(cfg)


def splits(cfg: Config) -> tuple[str, ...]:
    """The splits this source has, among `SPLITS` (always "train"; "validation" if any)."""
    if cfg.data.source == "shapes":
        return SPLITS
    raise ValueError(f"data.source={cfg.data.source!r} has no files.")


def build(cfg: Config) -> None:
    """Makes the source readable: renders the embedded dataset; for other sources checks that
    the data exists and says what to run if it does not."""
    if cfg.data.source == "shapes":
        from tfx_jax.data import builders

        builders.build(
            str(epath.Path(cfg.data.data_dir) / "tfds"), cfg.data.tfds_config, cfg.data.image_size
        )
        return
    raise ValueError(f"data.source={cfg.data.source!r} has no files.")


def open_split(cfg: Config, split: str) -> Sequence[dict]:
    """Random access to the raw examples of `split` (see the module docstring)."""
    if cfg.data.source == "shapes":
        from tfx_jax.data import builders

        d = cfg.data
        return builders.data_source(
            str(epath.Path(d.data_dir) / "tfds"), split, d.tfds_config, d.image_size
        )
    raise ValueError(f"data.source={cfg.data.source!r} has no files.")


def prompts(cfg: Config, num: int, seed: int = 0) -> list[str]:
    """Captions to draw sample images for during eval: held-out attribute combinations for the
    shapes data; for other sources, captions of validation examples."""
    if cfg.data.source == "shapes":
        import numpy as np

        from tfx_jax.data import shapes

        rng = np.random.default_rng(seed)
        return [shapes.caption(shapes.sample_scene(rng, "heldout")) for _ in range(num)]
    raise ValueError(f"data.source={cfg.data.source!r} has no files.")
