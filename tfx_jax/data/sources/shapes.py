"""source=shapes: the embedded `tfx_shapes` TFDS dataset (`tfx_jax.data.embedded`), rendered
locally from a seed into `<data_dir>/tfds` (ArrayRecord); its judge
(`embedded.judge.ShapesJudge`) reads generated images and captions back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from etils import epath

from tfx_jax.data.embedded import builders, shapes
from tfx_jax.data.embedded.judge import ShapesJudge
from tfx_jax.data.judging import Judge
from tfx_jax.data.sources.base import SPLITS, Source, register

if TYPE_CHECKING:
    from tfx_jax.data.config import DataConfig, RunConfig


def _tfds_dir(d: DataConfig) -> str:
    return str(epath.Path(d.data_dir) / "tfds")


@register
class Shapes(Source):
    name = "shapes"
    has_images = True

    def source_id(self, cfg: RunConfig) -> str:
        return f"shapes_{cfg.data.tfds_config}_{cfg.data.image_size}px"

    def splits(self, cfg: RunConfig) -> tuple[str, ...]:
        return SPLITS

    def build(self, cfg: RunConfig) -> None:
        builders.build(_tfds_dir(cfg.data), cfg.data.tfds_config, cfg.data.image_size)

    def open_split(self, cfg: RunConfig, split: str) -> Sequence[dict]:
        return builders.data_source(
            _tfds_dir(cfg.data), split, cfg.data.tfds_config, cfg.data.image_size
        )

    def prompts(self, cfg: RunConfig, num: int, seed: int = 0) -> list[str]:
        """Captions of held-out attribute combinations, from the config's tier (`single`: one
        object per caption)."""
        spec = builders.get_config(cfg.data.tfds_config).spec
        rng = np.random.default_rng(seed)
        return [shapes.caption(shapes.sample_scene(rng, "heldout", spec)) for _ in range(num)]

    def judge(self, cfg: RunConfig) -> Judge:
        """The shapes judge bound to the config's tier and image size (what its
        `classifier_data` renders)."""
        spec = builders.get_config(cfg.data.tfds_config).spec
        return ShapesJudge(spec, cfg.data.image_size)

    def describe(self, cfg: RunConfig) -> str:
        return f"shapes ({cfg.data.tfds_config})"
