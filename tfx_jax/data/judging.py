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
A judge may also render labelled images of its world (`classifier_data`, `LabelledImages`):
what `eval` trains the classifier of its in-domain FD on (`tfx_jax.eval.fd`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class LabelledImages:
    """Images of a judged source's world and what is in them (`Judge.classifier_data`): what
    the in-domain FD's feature classifier is trained and tested on (`tfx_jax.eval.fd`).

    Attributes:
      images: uint8 [N, S, S, 3], at the run's image size.
      labels: int [N, K]: for each of K labels (heads) of an image its class, in
        0..classes[k]-1 (the shapes world: shape, colour and size of what sits in each of the
        9 grid cells, 0 = nothing there).
      classes: the number of classes of each head, K entries.
      name: the world in a word, for what is printed ("shapes": "in-domain FD (shapes
        classifier features, not ImageNet FID)").
      world: everything the images are drawn from besides the seed and count (the tier, the
        image size); stamped with the trained classifier, so another world trains another.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[int, ...]
    name: str
    world: str


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

    def classifier_data(self, num: int, seed: int) -> LabelledImages | None:
        """`num` labelled images of the world this judge's source draws from (its tier and
        image size), deterministic in (num, seed), for the in-domain FD's classifier
        (`tfx_jax.eval.fd`); None: the judge has none, so `eval` reports no FD."""
        ...
