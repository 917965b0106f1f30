"""A second judged dataset is one module: a source and its judge, registered here, are what the
eval package scores with — its prompt splits, its caption reader, its attributes and groups —
with no edit outside this file (issue 24). No model: the generator is replaced by one that
draws and captions by hand, so only the scoring runs."""

from __future__ import annotations

import dataclasses
import re
import types

import numpy as np
import pytest

from tfx_jax.config import Config
from tfx_jax.data import sources
from tfx_jax.data.config import DataConfig
from tfx_jax.eval import command, fd, prompts

# ----------------------------------------------------------------------------- the dataset

PALETTE = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
WARM = {"red"}


@dataclasses.dataclass(frozen=True)
class Square:
    """The one object of a scene: a square filling the image."""

    color: str


def _image(color: str, size: int = 8) -> np.ndarray:
    return np.broadcast_to(np.array(PALETTE[color], np.uint8), (size, size, 3)).copy()


class SquareJudge:
    """Reads the mean colour of an image; captions are "a <colour> square"."""

    attributes = ("color",)
    prompt_splits = ("train", "heldout")
    groups = ("warm", "cool")

    def parse(self, text):
        m = re.fullmatch(r"a (\w+) square", text.strip())
        return (Square(m[1]),) if m and m[1] in PALETTE else None

    def read_caption(self, text):
        scene = self.parse(text.split(".")[0])
        if scene is not None:
            return scene, True
        named = [c for c in re.findall(r"\b(\w+) square", text) if c in PALETTE]
        return tuple(Square(c) for c in named[:1]), False

    def score_image(self, image, scene):
        mean = np.asarray(image, np.float64).reshape(-1, 3).mean(0)
        near = min(PALETTE, key=lambda c: np.sum((mean - PALETTE[c]) ** 2))
        return self.compare(scene, (Square(near),))

    def compare(self, expected, found):
        (want,) = expected
        right = bool(found) and found[0].color == want.color
        obj = {"prompt": want, "found": found[0] if found else None, "color": right}
        obj["present"] = right
        return {
            "exact": right and len(found) == 1,
            "count": len(found) == 1,
            "num_prompted": 1,
            "num_detected": len(found),
            "fraction": float(right),
            "color": float(right),
            "objects": [obj],
        }

    def groups_of(self, obj):
        return ("warm",) if obj.color in WARM else ("cool",)

    def to_json(self, judged):
        out = {k: v for k, v in judged.items() if k != "objects"}
        out["objects"] = [
            {"prompt": o["prompt"].color, "found": o["found"] and o["found"].color}
            for o in judged["objects"]
        ]
        return out

    def classifier_data(self, num, seed):
        return None  # no labelled images: no in-domain FD


class Squares(sources.Source):
    """train: red and green squares; heldout: blue ones (a colour never seen in training)."""

    name = "test_squares"
    has_images = True
    COLORS = {"train": ("red", "green"), "heldout": ("blue",), "validation": ("red",)}

    def source_id(self, cfg):
        return "test_squares"

    def splits(self, cfg):
        return tuple(self.COLORS)

    def open_split(self, cfg, split):
        return [
            {"kind": "caption", "text": f"a {c} square", "images": [_image(c)]}
            for c in self.COLORS[split]
        ]

    def judge(self, cfg):
        return SquareJudge()

    def describe(self, cfg):
        return "squares (3 colours)"


@pytest.fixture
def squares(monkeypatch):
    """The source registered for this test only (the registry is restored after), and a config
    naming it."""
    monkeypatch.setattr(sources.base, "_REGISTRY", dict(sources.base._REGISTRY))
    sources.register(Squares)
    return Config(data=DataConfig(source="test_squares", image_size=8))


# ----------------------------------------------------------------------------- the tests


def test_the_eval_package_asks_the_source_for_its_judge(squares):
    source = sources.of(squares)
    assert isinstance(source.judge(squares), SquareJudge)
    assert prompts.prompt_splits(squares, source) == ("train", "heldout")
    examples = prompts.caption_examples(squares, source, "train", 5)
    assert sorted(ex.text for ex in examples) == ["a green square", "a red square"]
    assert command.config_brief(squares)["data"].startswith("squares (3 colours), seq_len")


def test_prompting_scores_with_the_sources_judge_and_caption_reader(squares, monkeypatch):
    """Every prompt is drawn red and every image captioned "a red square, ...": the judge's
    reading gives the per-split, per-attribute and per-group numbers, under the same keys the
    shapes world's judge fills."""
    monkeypatch.setattr(prompts.artifacts, "load_tokenizer", lambda cfg: None)
    monkeypatch.setattr(prompts.artifacts, "load_vae", lambda cfg: None)

    def generate(cfg, params, tokenizer, prompts_, options, **kw):
        return [types.SimpleNamespace(images=[types.SimpleNamespace(image=_image("red"))])] * len(
            prompts_
        )

    def caption_images(cfg, params, tokenizer, images, vae, options, **kw):
        return [types.SimpleNamespace(text="a red square, I think")] * len(images)

    monkeypatch.setattr(prompts.sample, "generate", generate)
    monkeypatch.setattr(prompts.sample, "caption_images", caption_images)

    prompting = prompts.Prompting(squares, num=4)
    assert [ex.split for ex in prompting.examples] == ["train", "train", "heldout"]
    drawn, captioned, m = prompting(squares, params=None, mesh=None)

    # red drawn for {red, green} (train) and {blue} (heldout)
    assert m["eval/judge/train/color"] == 0.5 and m["eval/judge/train/objects"] == 0.5
    assert m["eval/judge/train/prompts"] == 2 and m["eval/judge/train/one_object/objects"] == 0.5
    assert m["eval/judge/heldout/attributes"] == 0.0
    assert m["eval/judge_fraction"] == m["eval/judge/heldout/objects"] == 0.0
    assert m["eval/judge/warm/objects"] == 1.0 and m["eval/judge/cool/objects"] == 0.0
    assert "eval/judge/train/shape" not in m  # the shapes world's attributes are not assumed
    # captions: read by the judge's reader ("a red square, ..." is outside its grammar)
    assert m["eval/caption/train/color"] == 0.5 and m["eval/caption/heldout/color"] == 0.0
    assert m["eval/caption/train/parsed"] == 0.0
    assert [c.read for c in captioned] == [False] * 3
    # eval.json's records come from the judge's own JSON
    samples, captions = command._records(drawn, captioned, prompting.judge, None, "x", False)
    assert samples[0]["judge"]["objects"][0]["found"] == "red"
    assert {c["judge"]["objects"][0]["prompt"] for c in captions} == {"red", "green", "blue"}


def test_a_judge_without_classifier_data_gets_no_fd(squares, tmp_path):
    cfg = dataclasses.replace(
        squares, data=dataclasses.replace(squares.data, data_dir=str(tmp_path))
    )
    source = sources.of(cfg)
    ex = prompts.caption_examples(cfg, source, "train", 1)[0]
    prompting = types.SimpleNamespace(
        judge=source.judge(cfg), splits=("train",), examples=[ex], source=source
    )
    assert fd.fd_metrics(cfg, prompting, [prompts.Drawn(ex, ex.image, None)]) == ({}, None)
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_a_source_without_a_judge_is_drawn_but_not_scored(squares, monkeypatch):
    monkeypatch.setattr(Squares, "judge", lambda self, cfg: None)
    source = sources.of(squares)
    assert prompts.prompt_splits(squares, source) == ("validation",)
    assert prompts.prompt_metrics([], [], None) == {}


def test_a_mixture_is_judged_by_its_judged_component(squares):
    mix = dataclasses.replace(
        squares,
        data=DataConfig(
            source="mixture",
            image_size=8,
            mixture=("words 1 source=text path=/nowhere", "sq 1 source=test_squares"),
        ),
    )
    assert isinstance(sources.of(mix).judge(mix), SquareJudge)
