"""What a source's judge is (`Judge`): how generated images and captions are read back and scored.

A source with a judge returns one from `Source.judge(cfg)` (`tfx_jax.data.sources.base`); the
eval package (`tfx_jax.eval.prompts`) asks it for everything it scores, so a new judged
dataset is one source module and its judge, with no edit anywhere else.

A *scene* is what a caption says is in an image, in the judge's own terms (the shapes world's
is a tuple of `SceneObject`s); the eval package never looks inside one. A *judged* result
(`score_image`, `compare`) is a dict with at least

    "exact": bool             the image (or caption) shows exactly the scene and nothing else
    "count": bool             as many objects were found as the scene has
    "num_prompted": int       objects in the scene (>= 1)
    "objects": list of dicts  one per object of the scene, after a one-to-one matching with
                              what was found: "prompt" (the object asked for), a bool per name
                              of `attributes`, and "present" (all of them right)

from which the eval package makes eval/judge/... and eval/caption/... (`judged_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Judge(Protocol):
    """Reads a source's generated images and captions back and scores them against a scene.

    Attributes:
      attributes: what each object is scored on, in report order (the shapes world: shape,
        color, size, position); each is a metric key (`eval/judge/<split>/<attribute>`).
      prompt_splits: the splits whose captions are the prompts, in order (the shapes world:
        train = seen combinations, heldout = unseen ones); those the source lacks are skipped.
      groups: per-object groupings across splits, in report order (the shapes world: pair_seen,
        pair_heldout, row_top, row_middle, row_bottom): metric keys `eval/judge/<group>/...`.
    """

    attributes: tuple[str, ...]
    prompt_splits: tuple[str, ...]
    groups: tuple[str, ...]

    def parse(self, text: str) -> Sequence[Any] | None:
        """The scene a prompt (a caption of the source) asks for; None when `text` is outside
        the judge's grammar (a mixture's other captions), so it is drawn but not scored."""
        ...

    def read_caption(self, text: str) -> tuple[Sequence[Any], bool]:
        """The scene a generated caption names, and whether the caption is in the grammar
        (False: what could be read of it anyway, maybe nothing)."""
        ...

    def score_image(self, image: np.ndarray, scene: Sequence[Any]) -> dict:
        """An image [S, S, 3] uint8 read back and judged against the scene it should show."""
        ...

    def compare(self, expected: Sequence[Any], found: Sequence[Any]) -> dict:
        """A scene read some other way (`read_caption`) judged against the true one, as
        `score_image` judges an image."""
        ...

    def groups_of(self, obj: Any) -> Sequence[str]:
        """The `groups` an object of a scene counts in."""
        ...

    def to_json(self, judged: dict) -> dict:
        """A judged result as JSON (eval.json's "judge" of each sample and caption)."""
        ...
