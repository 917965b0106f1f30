"""A rule-based judge that reads a shapes scene back from an image and scores it against a prompt.

How it reads an image (numpy only):
  1. Colour: each pixel is read as a mix of the background and one palette colour; it takes that
     colour if the mix is within `COLOR_THRESHOLD` of the pixel and covers at least half of it
     (`classify_pixels`). Palette entries are >= 95 apart, so mild noise never flips a colour,
     and a blurred edge is cut where the crisp edge was.
  2. Objects: 8-connected components per colour (flood fill). Components smaller than
     `MIN_AREA_FRACTION` of the smallest rendered shape are noise and dropped.
  3. Shape and size, jointly: the component is compared with the exact footprint of every
     (shape, size) at this image size (`shapes.shape_mask`), and with what that footprint reads
     as after a mild blur, centroid-aligned and shifted by up to one pixel; the highest
     intersection-over-union wins. Matching whole templates is more robust than hand-made
     geometric features at 5-pixel sizes, where a circle and a square differ by four corner
     pixels.
  4. Position: the grid cell of the best template placement's centre.

On ground-truth renders this is exact (see tests); the scores below let callers measure generated
images: `score(image, prompt)` gives per-object attribute correctness after an optimal one-to-one
matching of prompted to detected objects, the count check, a fraction and an overall `exact`.
`JUDGE` is the shapes source's `Judge` (`tfx_jax.data.judging`, `Source.judge`): what the eval
package scores images and captions with, the caption grammar and groupings included; the
source binds one to its tier and image size (`ShapesJudge(spec, image_size)`), which is what
`classifier_data` renders the in-domain FD's classifier data from.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import numpy as np

from tfx_jax.data.embedded import shapes
from tfx_jax.data.judging import LabelledImages

# RGB distance from the nearest background-to-colour mix beyond which a pixel is off the palette.
COLOR_THRESHOLD = 40.0
# Components below this fraction of the smallest rendered footprint are noise.
MIN_AREA_FRACTION = 0.4
# Blurs (std in pixels at 32x32, scaled with the image) that the shape templates model. Beyond
# ~0.9 px a small circle and a small square blur into the same footprint: nothing can tell them
# apart after that.
BLUR_SIGMAS = (0.0, 0.5, 0.7, 0.9)
# Components whose best template IoU is below this are blobs, not shapes.
MIN_MATCH = 0.3
# At most this many candidate objects enter the prompt matching (the largest ones).
_MAX_MATCH_CANDIDATES = 12
_ATTRIBUTES = ("shape", "color", "size", "position")
_BACKGROUND = np.array(shapes.BACKGROUND, np.float32)
# Directions from the background to each palette colour, [C, 3].
_DIRECTIONS = np.array(list(shapes.COLORS.values()), np.float32) - _BACKGROUND
_DIRECTION_NORM2 = (_DIRECTIONS**2).sum(-1)
_COLOR_NAMES = (None, *shapes.COLORS)


@dataclasses.dataclass(frozen=True)
class Detection:
    """One object found in an image.

    Attributes:
      object: the object as read (shape, colour, size, position).
      area: number of pixels in its connected component.
      match: intersection-over-union with the best (shape, size) template, in [0, 1].
      centroid: (row, col) of the component's pixels.
    """

    object: shapes.SceneObject
    area: int
    match: float
    centroid: tuple[float, float]


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Labels every pixel with the palette colour covering at least half of it.

    A blurred edge pixel is a mix `background + a * (colour - background)`. Projecting each pixel
    onto the segment from the background to each palette colour gives its coverage `a` and the
    distance off that segment; the pixel takes the colour with the smallest distance if that is
    within `COLOR_THRESHOLD` and `a >= 0.5`. Thresholding coverage at one half puts a blurred
    edge back where the crisp edge was, so shapes keep their size and corners under mild blur;
    on crisp renders (a = 0 or 1) it is plain nearest-colour classification.

    Args:
      image: [H, W, 3] uint8 (or float in 0..255) RGB image.

    Returns:
      [H, W] int array: 1..6 the colours of `shapes.COLORS` in order, 0 background (or less
      than half covered), -1 off the palette (farther than the threshold from every colour).
    """
    v = np.asarray(image, np.float32)[..., :3] - _BACKGROUND  # [H, W, 3]
    coverage = np.clip(v @ _DIRECTIONS.T / _DIRECTION_NORM2, 0.0, 1.0)  # [H, W, C]
    off2 = ((v[:, :, None, :] - coverage[..., None] * _DIRECTIONS) ** 2).sum(-1)  # [H, W, C]
    best = off2.argmin(-1)
    best_off2 = np.take_along_axis(off2, best[..., None], -1)[..., 0]
    best_coverage = np.take_along_axis(coverage, best[..., None], -1)[..., 0]
    on_palette = best_off2 <= COLOR_THRESHOLD**2
    labels = np.where(on_palette & (best_coverage >= 0.5), best + 1, 0)
    return np.where(on_palette | ((v**2).sum(-1) <= COLOR_THRESHOLD**2), labels, -1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an [N, 2] array of (row, col)."""
    height, width = mask.shape
    todo = mask.copy()
    out = []
    for start in zip(*np.nonzero(mask), strict=True):
        if not todo[start]:
            continue
        todo[start] = False
        stack, pixels = [start], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for nr in range(max(r - 1, 0), min(r + 2, height)):
                for nc in range(max(c - 1, 0), min(c + 2, width)):
                    if todo[nr, nc]:
                        todo[nr, nc] = False
                        stack.append((nr, nc))
        out.append(np.array(pixels))
    return out


def _blur_and_threshold(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (std `sigma` px) then >= 0.5: how a blurred footprint reads after
    `classify_pixels`. The output frame grows by the blur radius on every side."""
    radius = int(np.ceil(3 * sigma))
    x = np.pad(mask.astype(np.float64), radius)
    if sigma > 0:
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        taps /= taps.sum()
        x = np.apply_along_axis(np.convolve, 0, x, taps, "same")
        x = np.apply_along_axis(np.convolve, 1, x, taps, "same")
    return x >= 0.5 - 1e-9


@functools.cache
def _templates(image_size: int) -> tuple[tuple[str, str, np.ndarray, np.ndarray, int], ...]:
    """Footprints to match: (shape, size, mask, mask centroid, anchor index in the mask frame).

    Each (shape, size) contributes its crisp footprint and what it reads as after a Gaussian
    blur of `BLUR_SIGMAS` (deduplicated): blur rounds off one-pixel tips and corners (a small
    diamond becomes a 3x3 block), which would otherwise be mistaken for another crisp shape.
    """
    out = []
    for size in shapes.SIZES:
        for shape in shapes.SHAPES:
            crisp = shapes.shape_mask(shape, shapes.object_diameter(size, image_size))
            variants: list[np.ndarray] = []
            for sigma in BLUR_SIGMAS:
                # Same frame for every variant so the anchor (centre pixel) stays put.
                mask = _blur_and_threshold(crisp, sigma * image_size / 32)
                pad = int(np.ceil(3 * max(BLUR_SIGMAS) * image_size / 32)) - (
                    (mask.shape[0] - crisp.shape[0]) // 2
                )
                mask = np.pad(mask, pad)
                if mask.any() and not any(np.array_equal(mask, v) for v in variants):
                    variants.append(mask)
            for mask in variants:
                out.append((shape, size, mask, np.argwhere(mask).mean(0), mask.shape[0] // 2))
    return tuple(out)


def _best_template(
    pixels: np.ndarray, image_size: int
) -> tuple[str, str, float, tuple[float, float]]:
    """Finds the (shape, size) whose footprint best overlaps a component.

    Returns:
      (shape, size, iou, (row, col) of the placed template's centre pixel).
    """
    templates = _templates(image_size)
    pad = max(t.shape[0] for _, _, t, _, _ in templates) + 2
    canvas = np.zeros((image_size + 2 * pad,) * 2, bool)
    canvas[pixels[:, 0] + pad, pixels[:, 1] + pad] = True
    centroid = pixels.mean(0)
    best = ("", "", -1.0, (0.0, 0.0))
    for shape, size, template, t_centroid, anchor in templates:
        d = template.shape[0]
        top, left = np.round(centroid - t_centroid).astype(int)
        for dy, dx in itertools.product((0, -1, 1), repeat=2):
            y0, x0 = top + dy + pad, left + dx + pad
            if not (0 <= y0 <= canvas.shape[0] - d and 0 <= x0 <= canvas.shape[1] - d):
                continue
            inter = np.count_nonzero(canvas[y0 : y0 + d, x0 : x0 + d] & template)
            iou = inter / (len(pixels) + np.count_nonzero(template) - inter)
            if iou > best[2]:
                best = (shape, size, iou, (float(top + dy + anchor), float(left + dx + anchor)))
    return best


def detect(image: np.ndarray) -> list[Detection]:
    """Finds the objects in an image.

    Args:
      image: [S, S, 3] RGB image (uint8, or float in 0..255), square, as rendered by
        `shapes.render` or generated to imitate it.

    Returns:
      Detections in reading order (by grid cell, then by column of the centroid).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square [S, S, 3] image, got shape {image.shape}")
    image_size = image.shape[0]
    labels = classify_pixels(image)
    smallest = min(np.count_nonzero(t) for _, _, t, _, _ in _templates(image_size))
    min_area = max(2, int(np.ceil(MIN_AREA_FRACTION * smallest)))
    found = []
    for color_index in range(1, len(_COLOR_NAMES)):
        for pixels in _components(labels == color_index):
            if len(pixels) < min_area:
                continue
            shape, size, iou, (row, col) = _best_template(pixels, image_size)
            if iou < MIN_MATCH:
                continue
            obj = shapes.SceneObject(
                shape, _COLOR_NAMES[color_index], size, shapes.position_of(row, col, image_size)
            )
            centroid = tuple(float(v) for v in pixels.mean(0))
            found.append(Detection(obj, len(pixels), float(iou), centroid))
    found.sort(key=lambda d: (shapes.POSITIONS.index(d.object.position), d.centroid[1]))
    return found


def read_scene(image: np.ndarray) -> shapes.Scene:
    """Reads the scene shown in an image.

    Args:
      image: [S, S, 3] RGB image.

    Returns:
      The detected objects in reading order; compare with `shapes.canonical(expected)`.
    """
    return tuple(d.object for d in detect(image))


def _match(
    prompted: Sequence[shapes.SceneObject], detected: Sequence[shapes.SceneObject]
) -> list[shapes.SceneObject | None]:
    """One-to-one assignment of detected objects to prompted ones maximising agreement.

    Brute force over assignments (at most 3 prompted objects): first maximise the number of
    fully matching objects, then the number of matching attributes.
    """

    def agreement(p: shapes.SceneObject, d: shapes.SceneObject | None) -> tuple[int, int]:
        if d is None:
            return (0, 0)
        hits = sum(getattr(p, a) == getattr(d, a) for a in _ATTRIBUTES)
        return (int(hits == len(_ATTRIBUTES)), hits)

    # None pads the candidates so prompts can stay unmatched when too few objects were found.
    candidates = [*detected, *([None] * len(prompted))]
    best, best_value = [None] * len(prompted), (-1, -1)
    for order in itertools.permutations(range(len(candidates)), len(prompted)):
        chosen = [candidates[i] for i in order]
        scores = [agreement(p, d) for p, d in zip(prompted, chosen, strict=True)]
        value = (sum(s[0] for s in scores), sum(s[1] for s in scores))
        if value > best_value:
            best, best_value = chosen, value
    return best


def score(image: np.ndarray, prompt: str | Sequence[shapes.SceneObject]) -> dict:
    """Scores an image against the prompt (a caption or a scene) it should show.

    Args:
      image: [S, S, 3] RGB image.
      prompt: a caption of the shapes grammar, or the scene itself.

    Returns:
      A dict with
        "exact": bool, the image shows exactly the prompted objects and nothing else;
        "fraction": float, fraction of prompted objects present with all four attributes;
        "count": bool, the number of detected objects equals the number prompted;
        "num_prompted", "num_detected": ints;
        "shape", "color", "size", "position": floats, per-attribute accuracy over prompted
          objects (an unmatched prompted object counts as wrong on every attribute);
        "objects": one dict per prompted object: "prompt" and "found" (SceneObject or None),
          a bool per attribute and "present" (all four correct).
    """
    prompted = shapes.parse_caption(prompt) if isinstance(prompt, str) else tuple(prompt)
    if not prompted:
        raise ValueError("the prompt needs at least one object")
    detections = detect(image)
    # Garbage images can have many blobs; the largest ones are the only plausible matches.
    largest = sorted(detections, key=lambda d: -d.area)[:_MAX_MATCH_CANDIDATES]
    return _scored(prompted, [d.object for d in largest], len(detections))


def _scored(
    prompted: Sequence[shapes.SceneObject],
    candidates: Sequence[shapes.SceneObject],
    num_found: int,
) -> dict:
    """`score`'s result for prompted objects matched one-to-one among `candidates`, out of
    `num_found` objects found in all."""
    matched = _match(prompted, candidates)
    objects = []
    for p, d in zip(prompted, matched, strict=True):
        row = {"prompt": p, "found": d}
        row.update({a: d is not None and getattr(p, a) == getattr(d, a) for a in _ATTRIBUTES})
        row["present"] = all(row[a] for a in _ATTRIBUTES)
        objects.append(row)
    n = len(prompted)
    count = num_found == n
    result = {
        "exact": count and all(o["present"] for o in objects),
        "fraction": sum(o["present"] for o in objects) / n,
        "count": count,
        "num_prompted": n,
        "num_detected": num_found,
    }
    result.update({a: sum(o[a] for o in objects) / n for a in _ATTRIBUTES})
    result["objects"] = objects
    return result


# ---------------------------------------------------------------------------------------------
# Scenes read some other way (captions), and where objects sit.
# ---------------------------------------------------------------------------------------------

ROWS = ("top", "middle", "bottom")


def row_of(position: str) -> str:
    """The grid row of a position: "top", "middle" or "bottom" (positions are row-major)."""
    return ROWS[shapes.POSITIONS.index(position) // 3]


def compare(expected: Sequence[shapes.SceneObject], found: Sequence[shapes.SceneObject]) -> dict:
    """Scores a scene found some other way (a generated caption read with
    `shapes.parse_caption`) against the true scene, exactly as `score` scores an image: the
    same one-to-one matching, the same keys ("exact", "fraction", "count", "num_prompted",
    "num_detected", one accuracy per attribute, "objects"), with `expected` as the prompt.

    Args:
      expected: the true scene (at least one object).
      found: the scene that was read (may be empty: every expected object is then missed).
    """
    expected, found = tuple(expected), tuple(found)
    if not expected:
        raise ValueError("the expected scene needs at least one object")
    return _scored(expected, found[:_MAX_MATCH_CANDIDATES], len(found))


# ---------------------------------------------------------------------------------------------
# The shapes source's judge (`tfx_jax.data.judging.Judge`): what the eval package asks.
# ---------------------------------------------------------------------------------------------


# Entropy of `classifier_data`'s generators besides (seed, index), so its scenes are never the
# TFDS builder's (`shapes.example_rng`: [seed, split, index]).
_CLASSIFIER_STREAM = 0x5EED_FD


@dataclasses.dataclass(frozen=True)
class ShapesJudge:
    """The shapes world's `Judge`: images read by `score`, captions by the caption grammar
    (`shapes.parse_caption`, `shapes.read_caption`), objects grouped by whether their (shape,
    colour) pair is held out (`shapes.HELDOUT_PAIRS`) and by their grid row (`ROWS`).

    Attributes:
      spec: the tier its source's scenes are drawn from, and `image_size` their size: what
        `classifier_data` renders (reading and scoring do not depend on them).
    """

    spec: shapes.SceneSpec = shapes.SceneSpec()
    image_size: int = 32

    attributes = _ATTRIBUTES
    prompt_splits = ("train", "heldout")
    groups = ("pair_seen", "pair_heldout", *(f"row_{r}" for r in ROWS))

    def parse(self, text: str) -> shapes.Scene | None:
        try:
            return shapes.parse_caption(text)
        except ValueError:
            return None

    def read_caption(self, text: str) -> tuple[shapes.Scene, bool]:
        return shapes.read_caption(text)

    def score_image(self, image: np.ndarray, scene: Sequence[shapes.SceneObject]) -> dict:
        return score(image, scene)

    def compare(
        self, expected: Sequence[shapes.SceneObject], found: Sequence[shapes.SceneObject]
    ) -> dict:
        return compare(expected, found)

    def groups_of(self, obj: shapes.SceneObject) -> tuple[str, ...]:
        held = (obj.shape, obj.color) in shapes.HELDOUT_PAIRS
        return ("pair_heldout" if held else "pair_seen", f"row_{row_of(obj.position)}")

    def to_json(self, judged: dict) -> dict:
        """The numbers, and per object what was asked and what was read (as caption phrases),
        its grid row and a bool per attribute and "present"."""
        out = {k: v for k, v in judged.items() if k != "objects"}
        out["objects"] = [
            {
                "prompt": o["prompt"].phrase(),
                "found": o["found"].phrase() if o["found"] is not None else None,
                "row": row_of(o["prompt"].position),
                **{a: bool(o[a]) for a in (*_ATTRIBUTES, "present")},
            }
            for o in judged["objects"]
        ]
        return out

    def classifier_data(self, num: int, seed: int) -> LabelledImages:
        """`num` scenes of the tier rendered at `image_size`, labelled per grid cell: the
        shape, colour and size of the object in it (0: empty), 27 heads. Per cell, so the
        classifier's features see every object and where it is, not just what is in the
        image. Scenes alternate between seen (shape, colour) pairs and scenes with a held-out
        pair (`shapes.sample_scene`'s train and heldout), so all 24 pairs are drawn and the
        features tell the held-out ones apart too; scene i comes from (seed, i) alone."""
        images = np.empty((num, self.image_size, self.image_size, 3), np.uint8)
        labels = np.zeros((num, len(shapes.POSITIONS), 3), np.int32)
        for i in range(num):
            rng = np.random.default_rng([_CLASSIFIER_STREAM, seed, i])
            scene = shapes.sample_scene(rng, ("train", "heldout")[i % 2], self.spec)
            images[i] = shapes.render(scene, self.image_size)
            for obj in scene:
                labels[i, shapes.POSITIONS.index(obj.position)] = (
                    1 + shapes.SHAPES.index(obj.shape),
                    1 + list(shapes.COLORS).index(obj.color),
                    1 + shapes.SIZES.index(obj.size),
                )
        per_cell = (1 + len(shapes.SHAPES), 1 + len(shapes.COLORS), 1 + len(shapes.SIZES))
        return LabelledImages(
            images=images,
            labels=labels.reshape(num, -1),
            classes=per_cell * len(shapes.POSITIONS),
            name="shapes",
            world=f"{self.spec!r} at {self.image_size}px",
        )


JUDGE = ShapesJudge()
