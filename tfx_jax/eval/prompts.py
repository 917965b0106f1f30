"""Evaluation by prompts: images drawn for captions, captions written for images, both judged.

For each prompt split of a source (a judged source's `Judge.prompt_splits`, e.g. the shapes
world's train = seen shape/colour pairs and heldout = unseen ones; otherwise validation), a
fixed set of caption examples (`caption_examples`): the model draws an image for each caption
(`IMAGE_OPTIONS`) and writes a caption after each true image (`CAPTION_OPTIONS`, greedy); the
source's judge (`Source.judge`, `tfx_jax.data.judging.Judge`) reads the drawn images and the
generated captions back, and `prompt_metrics` turns both into the eval/judge/... and
eval/caption/... keys (`tfx_jax.eval` lists them). The same `Prompting` object serves training's
evaluators (every `train.eval_every` steps, the same examples each time) and the `eval`
command, so the numbers match.

    Prompting(cfg, num, seed)(cfg, params, mesh)  -> (drawn, captioned, metrics), any params
    prompt_metrics(drawn, captioned, judge)       -> the judged metrics
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from tfx_jax import artifacts
from tfx_jax.config import Config
from tfx_jax.data import sources
from tfx_jax.data.judging import Judge
from tfx_jax.data.sources import RecordError
from tfx_jax.generate import sample
from tfx_jax.generate.options import SampleOptions
from tfx_jax.observability.metric_writers import image_grid

log = logging.getLogger("tfx_jax")

# Images for prompts: DDIM with guidance 3, the image as the whole answer (BOI forced).
IMAGE_OPTIONS = SampleOptions(
    max_new_tokens=2, sampler="ddim", diffusion_steps=50, guidance_scale=3.0
)
# Captions: greedy text after the image, no image allowed, no image guidance; text guidance by
# the image only when asked (`eval --text-guidance S`: on the demo it did not help, RESULTS.md).
CAPTION_OPTIONS = SampleOptions(
    max_new_tokens=64, max_images=0, temperature=0.0, guidance_scale=None
)


def split_options(options: SampleOptions) -> tuple[SampleOptions, SampleOptions]:
    """(image options, caption options) of the `eval` command's one set of sampling flags:
    `text_guidance` is for the captions, every other flag for the images."""
    captions = dataclasses.replace(CAPTION_OPTIONS, text_guidance=options.text_guidance)
    return dataclasses.replace(options, text_guidance=1.0), captions


@dataclasses.dataclass(frozen=True)
class Example:
    """A caption example of a split: the prompt for an image, and the image to caption."""

    split: str
    text: str
    image: np.ndarray  # its true image, uint8 [S, S, 3]


@dataclasses.dataclass
class Drawn:
    """The image drawn for an example's caption, and the judge's reading of it (None: no
    judge, or a caption outside the judge's grammar; `Judge.score_image`)."""

    example: Example
    image: np.ndarray | None
    judged: dict | None


@dataclasses.dataclass
class Captioned:
    """The caption generated for an example's true image, and its comparison with the true
    scene (None: no judge; `Judge.compare`). `read` is False when the caption is outside the
    judge's grammar (what could be read of it is still scored, `Judge.read_caption`)."""

    example: Example
    text: str
    read: bool
    judged: dict | None


def prompt_splits(cfg: Config, source: sources.Source) -> tuple[str, ...]:
    """Where prompts come from: a judged source's prompt splits (`Judge.prompt_splits`: the
    shapes world's train and heldout combinations) that it has; otherwise its validation split
    (else train)."""
    have = source.splits(cfg)
    judge = source.judge(cfg)
    if judge is not None:
        judged = tuple(s for s in judge.prompt_splits if s in have)
        if judged:
            return judged
    return ("validation",) if "validation" in have else ("train",)


def caption_examples(
    cfg: Config, source: sources.Source, split: str, num: int, seed: int = 0
) -> list[Example]:
    """`num` caption examples (one image, a non-empty text) of `split`, in an order drawn from
    (seed, split); the first k of `num` are the examples `num=k` gives."""
    data = source.open_split(cfg, split)
    order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(len(data))
    out: list[Example] = []
    for index in order:
        if len(out) == num:
            break
        try:
            ex = data[int(index)]
        except RecordError:  # an unusable record is no prompt (the stages count it)
            continue
        text = ex["text"].strip()
        if ex.get("kind", "caption") == "caption" and len(ex["images"]) == 1 and text:
            out.append(Example(split, text, np.asarray(ex["images"][0], np.uint8)))
    return out


class Prompting:
    """Images for the captions of each prompt split and captions for their true images, drawn
    with any params and scored by the source's judge (`judge`: None when it has none). The
    examples are fixed at construction (the same at every eval of a run)."""

    def __init__(
        self,
        cfg: Config,
        num: int,
        seed: int = 0,
        splits: Sequence[str] | None = None,
    ):
        self.source = sources.of(cfg)
        self.judge: Judge | None = self.source.judge(cfg)
        self.splits = tuple(splits or prompt_splits(cfg, self.source))
        self.examples = [
            ex for s in self.splits for ex in caption_examples(cfg, self.source, s, num, seed)
        ]
        self.tokenizer = artifacts.load_tokenizer(cfg)
        self.vae = artifacts.load_vae(cfg)

    def draw(
        self,
        cfg: Config,
        params: Any,
        mesh: Mesh,
        options: SampleOptions = IMAGE_OPTIONS,
        on_row: Callable | None = None,
    ) -> list[Drawn]:
        """An image per example's caption (BOI forced), judged against the caption (`on_row`:
        rolling mode's row callback, `sample.generate`)."""
        prompts = [sample.Prompt(ex.text, (), True) for ex in self.examples]
        results = sample.generate(
            cfg, params, self.tokenizer, prompts, options, vae=self.vae, mesh=mesh, on_row=on_row
        )
        drawn = []
        for ex, res in zip(self.examples, results, strict=True):
            image = res.images[0].image if res.images else None
            scene = self._scene(ex)
            judged = self.judge.score_image(image, scene) if scene and image is not None else None
            drawn.append(Drawn(ex, image, judged))
        return drawn

    def _scene(self, ex: Example) -> Sequence[Any] | None:
        """The scene a prompt asks for, when the source has a judge and the caption is in its
        grammar (a mixture's other captions are not)."""
        return None if self.judge is None else self.judge.parse(ex.text)

    def caption(
        self, cfg: Config, params: Any, mesh: Mesh, options: SampleOptions = CAPTION_OPTIONS
    ) -> list[Captioned]:
        """A greedy caption after each example's true image, compared with its true scene."""
        if not self.examples:
            return []
        images = np.stack([ex.image for ex in self.examples])
        results = sample.caption_images(
            cfg, params, self.tokenizer, images, self.vae, options, mesh=mesh
        )
        out = []
        for ex, res in zip(self.examples, results, strict=True):
            text = res.text.strip()
            truth = self._scene(ex)
            if self.judge is None:
                out.append(Captioned(ex, text, False, None))
                continue
            found, in_grammar = self.judge.read_caption(text)
            judged = self.judge.compare(truth, found) if truth else None
            out.append(Captioned(ex, text, in_grammar, judged))
        return out

    def __call__(
        self,
        cfg: Config,
        params: Any,
        mesh: Mesh,
        options: SampleOptions = IMAGE_OPTIONS,
        on_row: Callable | None = None,
        captions: bool = True,
        caption_options: SampleOptions = CAPTION_OPTIONS,
    ) -> tuple[list[Drawn], list[Captioned], dict[str, float]]:
        """Draws, captions (unless not asked) and scores: (drawn, captioned, metrics)."""
        drawn = self.draw(cfg, params, mesh, options, on_row)
        captioned = []
        if captions:
            log.info("eval: %d captions, one after each true image", len(self.examples))
            captioned = self.caption(cfg, params, mesh, caption_options)
        return drawn, captioned, prompt_metrics(drawn, captioned, self.judge)


def sample_grid(drawn: Sequence[Drawn], cols: int = 8) -> np.ndarray:
    """The drawn images tiled in example order (a white pixel when none was drawn)."""
    images = [d.image for d in drawn if d.image is not None]
    if not images:
        return np.full((1, 1, 3), 255, np.uint8)
    return image_grid(np.stack(images), cols=min(cols, len(images)))


def _tally(
    objects: list[dict], results: list[dict] | None, attributes: Sequence[str]
) -> dict[str, float]:
    """ "attributes" (the share of object attributes right), "objects" (all of them right),
    and, for groups of whole results, the accuracy per attribute, "count", "exact" and the
    number of "prompts"."""
    per = {a: float(np.mean([o[a] for o in objects])) for a in attributes}
    out = {"attributes": float(np.mean(list(per.values())))}
    out["objects"] = float(np.mean([o["present"] for o in objects]))
    if results:
        out.update(per)
        out["count"] = float(np.mean([r["count"] for r in results]))
        out["exact"] = float(np.mean([r["exact"] for r in results]))
        out["prompts"] = float(len(results))
    return out


def judged_metrics(
    prefix: str, items: Sequence[tuple[str, dict]], judge: Judge
) -> dict[str, float]:
    """Metrics of judge results (`Judge.score_image` / `Judge.compare`) tagged with their
    split: `prefix/<split>/...`, `prefix/<split>/{one,multi}_object/...`, and per object across
    splits `prefix/<group>/...` for each of the judge's `groups` (the shapes world's
    pair_{seen,heldout} and row_{top,middle,bottom})."""
    out: dict[str, float] = {}

    def put(name: str, objects: list[dict], results: list[dict] | None) -> None:
        if objects:
            tally = _tally(objects, results, judge.attributes)
            out.update({f"{prefix}/{name}/{k}": v for k, v in tally.items()})

    for split in dict.fromkeys(s for s, _ in items):
        results = [r for s, r in items if s == split]
        groups = (
            (split, results),
            (f"{split}/one_object", [r for r in results if r["num_prompted"] == 1]),
            (f"{split}/multi_object", [r for r in results if r["num_prompted"] > 1]),
        )
        for name, rs in groups:
            put(name, [o for r in rs for o in r["objects"]], rs)
    tagged = [(o, set(judge.groups_of(o["prompt"]))) for _, r in items for o in r["objects"]]
    for group in judge.groups:
        put(group, [o for o, in_groups in tagged if group in in_groups], None)
    return out


def prompt_metrics(
    drawn: Sequence[Drawn], captioned: Sequence[Captioned], judge: Judge | None
) -> dict[str, float]:
    """eval/judge/..., eval/judge_fraction and eval/caption/... of one evaluation (none
    without a judge)."""
    if judge is None:
        return {}
    items = [(d.example.split, d.judged) for d in drawn if d.judged]
    out = judged_metrics("eval/judge", items, judge)
    held = "eval/judge/heldout/objects"
    first = next((k for k in out if k.endswith("/objects")), None)
    if held in out or first:
        out["eval/judge_fraction"] = out[held] if held in out else out[first]
    judged = [(c.example.split, c.judged) for c in captioned if c.judged]
    out.update(judged_metrics("eval/caption", judged, judge))
    for split in dict.fromkeys(c.example.split for c in captioned):
        mine = [c for c in captioned if c.example.split == split]
        if any(c.judged for c in mine):
            out[f"eval/caption/{split}/parsed"] = float(np.mean([c.read for c in mine]))
    return out
