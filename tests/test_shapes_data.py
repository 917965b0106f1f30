"""Tests for the shapes dataset: scenes, captions, splits, text corpus, judge and TFDS builder."""

from __future__ import annotations

import itertools
import pickle
import re

import numpy as np
import pytest

from tfx_jax.data.embedded import builders, judge, shapes, text_corpus

PLACEHOLDER = shapes.IMAGE_PLACEHOLDER


def _scenes(n: int, seed: int, split: str = "train") -> list[shapes.Scene]:
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng, split) for _ in range(n)]


def _pairs_in_text(text: str) -> set[tuple[str, str]]:
    """(shape, colour) pairs named in any text of the grammar ("... red circle ...")."""
    words = r"(?P<color>{}) (?P<shape>{})".format("|".join(shapes.COLORS), "|".join(shapes.SHAPES))
    return {(m["shape"], m["color"]) for m in re.finditer(words, text)}


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (std `sigma` px) with edge replication, as [S, S] matrices."""
    size = image.shape[0]
    radius = int(np.ceil(3 * sigma))
    matrix = np.zeros((size, size))
    for offset in range(-radius, radius + 1):
        for i in range(size):
            matrix[i, min(max(i + offset, 0), size - 1)] += np.exp(-0.5 * (offset / sigma) ** 2)
    matrix /= matrix.sum(1, keepdims=True)
    return np.einsum("ij,jkc,lk->ilc", matrix, image, matrix, optimize=True)


def _degrade(image: np.ndarray, rng: np.random.Generator, noise: float, blur: float) -> np.ndarray:
    out = image.astype(np.float64)
    if blur:
        out = _gaussian_blur(out, blur * image.shape[0] / 32)
    out = out + rng.normal(0.0, noise, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _read_back_rate(image_size: int, n: int, noise: float = 0.0, blur: float = 0.0) -> float:
    rng = np.random.default_rng(1234 + image_size)
    hits = 0
    for i in range(n):
        scene = shapes.sample_scene(rng, "heldout" if i % 4 == 0 else "train")
        image = _degrade(shapes.render(scene, image_size), rng, noise, blur)
        hits += judge.read_scene(image) == shapes.canonical(scene)
    return hits / n


# ---------------------------------------------------------------------------------------------
# Scenes and captions.
# ---------------------------------------------------------------------------------------------


def test_caption_round_trip():
    for scene in _scenes(500, seed=0) + _scenes(100, seed=1, split="heldout"):
        text = shapes.caption(scene)
        assert shapes.parse_caption(text) == scene
        # Sentence forms of the same caption parse too.
        assert shapes.parse_caption(text[0].upper() + text[1:] + ".") == scene
    three = shapes.parse_caption(
        "a large red circle at the top left, a small blue square in the center "
        "and a small yellow diamond at the bottom"
    )
    assert [o.position for o in three] == ["top left", "center", "bottom"]
    assert three[0] == shapes.SceneObject("circle", "red", "large", "top left")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle at the top",  # no size
        "a large red circle",  # no position
        "a large pink circle in the center",  # unknown colour
        "a large red circle in the center and a small blue square in the center",  # same cell
        "a large red circle at the top, a small red circle at the bottom",  # no "and"
        "a small red circle at the top, a small red circle at the bottom, a small red circle on "
        "the left and a small red circle on the right",  # four objects
    ],
)
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError):
        shapes.parse_caption(text)


@pytest.mark.parametrize("image_size", [32, 64])
def test_render_keeps_every_object_inside_its_cell(image_size):
    cell = image_size / 3
    grid = itertools.product(shapes.POSITIONS, shapes.GRID_SIZES, shapes.SHAPES)
    for position, size, shape in grid:
        image = shapes.render((shapes.SceneObject(shape, "red", size, position),), image_size)
        assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
        rows, cols = np.nonzero((image != shapes.BACKGROUND).any(-1))
        row, col = divmod(shapes.POSITIONS.index(position), 3)
        # A one-pixel margin to the neighbouring cells keeps adjacent objects apart.
        assert rows.min() >= np.ceil(row * cell) and rows.max() < np.floor((row + 1) * cell)
        assert cols.min() >= np.ceil(col * cell) and cols.max() < np.floor((col + 1) * cell)
        assert (image[rows, cols] == shapes.COLORS["red"]).all()
    small = shapes.object_diameter("small", image_size)
    large = shapes.object_diameter("large", image_size)
    assert (small, large) == {32: (5, 9), 64: (11, 17)}[image_size]
    # A huge object (the demo's tier) is centred and keeps a margin to the image's edges.
    assert shapes.object_diameter("huge", image_size) == {32: 25, 64: 49}[image_size]
    for shape in shapes.SHAPES:
        image = shapes.render((shapes.SceneObject(shape, "red", "huge", "center"),), image_size)
        rows, cols = np.nonzero((image != shapes.BACKGROUND).any(-1))
        assert min(rows.min(), cols.min()) >= 3 and max(rows.max(), cols.max()) < image_size - 3
    with pytest.raises(ValueError, match="center"):
        shapes.render((shapes.SceneObject("circle", "red", "huge", "top left"),), image_size)


def test_shape_footprints_are_distinct():
    for image_size in (32, 64):
        footprints = {
            (shape, size): shapes.shape_mask(shape, shapes.object_diameter(size, image_size))
            for shape in shapes.SHAPES
            for size in shapes.SIZES
        }
        for (a, mask_a), (b, mask_b) in itertools.combinations(footprints.items(), 2):
            assert mask_a.shape != mask_b.shape or not np.array_equal(mask_a, mask_b), (a, b)


# ---------------------------------------------------------------------------------------------
# Examples and splits.
# ---------------------------------------------------------------------------------------------


def _assert_same_examples(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (key_a, ex_a), (key_b, ex_b) in zip(a, b, strict=True):
        assert key_a == key_b and ex_a["kind"] == ex_b["kind"] and ex_a["text"] == ex_b["text"]
        assert len(ex_a["images"]) == len(ex_b["images"])
        for image_a, image_b in zip(ex_a["images"], ex_b["images"], strict=True):
            np.testing.assert_array_equal(image_a, image_b)


def test_generate_examples_is_deterministic():
    first = list(shapes.generate_examples("train", 200, seed=7))
    _assert_same_examples(first, list(shapes.generate_examples("train", 200, seed=7)))
    # Example i does not depend on how many examples were asked for.
    _assert_same_examples(first[:50], list(shapes.generate_examples("train", 50, seed=7)))
    other_seed = list(shapes.generate_examples("train", 200, seed=8))
    assert [e["text"] for _, e in first] != [e["text"] for _, e in other_seed]
    validation = list(shapes.generate_examples("validation", 200, seed=7))
    assert [e["text"] for _, e in first] != [e["text"] for _, e in validation]


@pytest.mark.parametrize("image_size", [32, 64])
def test_example_schema(image_size):
    kinds = set()
    for key, example in shapes.generate_examples("train", 300, image_size=image_size):
        assert isinstance(key, int) and set(example) == {"kind", "text", "images"}
        assert isinstance(example["text"], str) and example["text"]
        for image in example["images"]:
            assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
        kinds.add(example["kind"])
        if example["kind"] == "caption":
            assert len(example["images"]) == 1 and PLACEHOLDER not in example["text"]
            scene = shapes.parse_caption(example["text"])
            assert judge.read_scene(example["images"][0]) == shapes.canonical(scene)
        elif example["kind"] == "interleaved":
            assert 2 <= len(example["images"]) <= 3
            assert example["text"].count(PLACEHOLDER) == len(example["images"])
        else:
            assert example["kind"] == "text" and example["images"] == []
            assert PLACEHOLDER not in example["text"]
    assert kinds == {"caption", "interleaved", "text"}


def test_mix_controls_example_kinds():
    def kinds(mix):
        return [e["kind"] for _, e in shapes.generate_examples("train", 400, mix=mix)]

    assert set(kinds((1, 0, 0))) == {"caption"}
    assert set(kinds((0, 1, 0))) == {"interleaved"}
    assert set(kinds((0, 0, 3))) == {"text"}
    default = kinds((0.7, 0.15, 0.15))
    assert 0.6 < default.count("caption") / len(default) < 0.8
    with pytest.raises(ValueError):
        kinds((1, -1, 0))


def test_interleaved_documents_cover_every_style():
    rng = np.random.default_rng(0)
    openings = set()
    for _ in range(300):
        text, images = shapes.interleaved_document(rng, "train", 32)
        assert text.count(PLACEHOLDER) == len(images) and 2 <= len(images) <= 3
        openings.add(text.split()[0])
        if " Now it is " in text:
            # Edit chains show one object per image, changed one attribute at a time.
            scenes = [judge.read_scene(image) for image in images]
            assert all(len(s) == 1 for s in scenes)
            for before, after in itertools.pairwise(scenes):
                changed = [
                    f
                    for f in ("shape", "color", "size", "position")
                    if getattr(before[0], f) != getattr(after[0], f)
                ]
                assert len(changed) == 1
    assert {"First,", "To", "Here", "Picture", PLACEHOLDER, "A"} <= openings


def test_heldout_pairs_never_in_train_and_always_in_heldout():
    assert len(shapes.HELDOUT_PAIRS) == 4
    assert {s for s, _ in shapes.HELDOUT_PAIRS} == set(shapes.SHAPES)
    for split in ("train", "validation"):
        for _, example in shapes.generate_examples(split, 2000, seed=3):
            assert not _pairs_in_text(example["text"]) & shapes.HELDOUT_PAIRS
            if example["kind"] == "interleaved":
                # Edit chains ("Now it is blue") can name a pair only implicitly: read the images.
                for image in example["images"]:
                    read = {(o.shape, o.color) for o in judge.read_scene(image)}
                    assert not read & shapes.HELDOUT_PAIRS
    for _, example in shapes.generate_examples("heldout", 300, seed=3):
        assert example["kind"] == "caption"
        scene = shapes.parse_caption(example["text"])
        assert {(o.shape, o.color) for o in scene} & shapes.HELDOUT_PAIRS


def test_single_tier():
    """The demo's tier: one huge centred object per caption and per interleaved image, the
    held-out pairs never in train/validation (text or pixels) and always in heldout, every
    caption parses and the judge reads every rendered image exactly."""
    spec = builders.get_config("single").spec
    assert spec == shapes.SINGLE
    (only,) = spec.sizes
    for split in shapes.SPLITS:
        examples = [e for _, e in shapes.generate_examples(split, 250, 32, 0, (6, 3, 1), spec)]
        kinds = {e["kind"] for e in examples}
        assert kinds == ({"caption"} if split == "heldout" else {"caption", "interleaved", "text"})
        for example in examples:
            scenes = [judge.read_scene(image) for image in example["images"]]
            assert all(len(s) == 1 and s[0].size == only for s in scenes), example["text"]
            assert all(s[0].position == "center" for s in scenes)
            pairs = {(o.shape, o.color) for s in scenes for o in s}
            if example["kind"] == "caption":
                scene = shapes.parse_caption(example["text"])
                assert scenes == [scene] and judge.score(example["images"][0], scene)["exact"]
            if split == "heldout":
                assert pairs <= shapes.HELDOUT_PAIRS and len(pairs) == 1
            else:
                assert not (pairs | _pairs_in_text(example["text"])) & shapes.HELDOUT_PAIRS
    # Every (shape, colour) of the tier renders and reads back, at both image sizes.
    for (shape, color), size in itertools.product(shapes.ALL_PAIRS, (32, 64)):
        scene = (shapes.SceneObject(shape, color, only, "center"),)
        assert judge.score(shapes.render(scene, size), shapes.caption(scene))["exact"]
    with pytest.raises(ValueError, match="center"):
        shapes.SceneSpec(max_objects=1, sizes=("huge",))


# ---------------------------------------------------------------------------------------------
# Text corpus.
# ---------------------------------------------------------------------------------------------


def test_text_corpus():
    train, validation = text_corpus.documents("train"), text_corpus.documents("validation")
    assert len(train) > 500 and len(validation) > 50
    assert not set(train) & set(validation)
    assert text_corpus.documents("train") == train  # cached and deterministic
    for doc in train + validation:
        assert text_corpus.MIN_CHARS <= len(doc) <= text_corpus.MAX_CHARS
        assert PLACEHOLDER not in doc and "  " not in doc and doc == doc.strip()
    assert (
        text_corpus.normalise("  Hello\n   world.\n\n >>> x = 1\n\nBye.  ") == "Hello world.\nBye."
    )
    text_docs = [
        e["text"] for _, e in shapes.generate_examples("validation", 300) if not e["images"]
    ]
    assert text_docs and set(text_docs) <= set(validation)


# ---------------------------------------------------------------------------------------------
# Judge.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image_size", "n"), [(32, 400), (64, 150)])
def test_judge_reads_ground_truth_exactly(image_size, n):
    assert _read_back_rate(image_size, n) >= 0.99


@pytest.mark.parametrize(
    ("image_size", "noise", "blur", "bar"),
    [
        (32, 8.0, 0.0, 0.95),  # sigma = 8/255
        (64, 8.0, 0.0, 0.95),
        (32, 8.0, 0.7, 0.95),  # and slightly blurry, like a VAE reconstruction
        (64, 8.0, 0.7, 0.95),
    ],
)
def test_judge_is_robust_to_mild_noise_and_blur(image_size, noise, blur, bar):
    rate = _read_back_rate(image_size, 300 if image_size == 32 else 100, noise, blur)
    print(f"judge read-back at {image_size}px, noise {noise}, blur {blur}: {rate:.3f}")
    assert rate >= bar


def test_every_template_reads_back_as_itself():
    # Ties between footprints would make the judge ambiguous; every (blurred) variant must win
    # for its own shape and size.
    for image_size in (32, 64):
        for shape, size, mask, _, anchor in judge._templates(image_size):
            image = np.full((image_size, image_size, 3), shapes.BACKGROUND, np.uint8)
            top = image_size // 2 - anchor
            window = image[top : top + mask.shape[0], top : top + mask.shape[1]]
            window[mask] = shapes.COLORS["blue"]
            (detection,) = judge.detect(image)
            assert (detection.object.shape, detection.object.size) == (shape, size)
            assert detection.object.position == "center" and detection.match == 1.0


def test_judge_ignores_specks_and_off_palette_pixels():
    scene = (shapes.SceneObject("square", "green", "large", "top left"),)
    image = shapes.render(scene)
    image[20, 20] = shapes.COLORS["red"]  # a one-pixel speck
    image[25:29, 3:7] = (128, 128, 128)  # grey: on no background-to-colour line
    assert judge.read_scene(image) == scene
    labels = judge.classify_pixels(image)
    assert labels[26, 4] == -1 and labels[0, 0] == 0 and labels[5, 5] == 2


def test_score():
    prompt = "a large red circle at the top left and a small blue square in the center"
    image = shapes.render(shapes.parse_caption(prompt))
    full = judge.score(image, prompt)
    assert full["exact"] and full["count"] and full["fraction"] == 1.0
    assert all(full[a] == 1.0 for a in ("shape", "color", "size", "position"))

    moved = judge.score(image, prompt.replace("in the center", "on the right"))
    assert not moved["exact"] and moved["count"] and moved["fraction"] == 0.5
    assert moved["position"] == 0.5 and moved["shape"] == moved["color"] == moved["size"] == 1.0
    assert moved["objects"][1]["found"].position == "center"

    extra = judge.score(image, "a large red circle at the top left")
    assert not extra["exact"] and not extra["count"] and extra["fraction"] == 1.0

    missing = judge.score(shapes.render(shapes.parse_caption(prompt)[:1]), prompt)
    assert missing["num_detected"] == 1 and missing["fraction"] == 0.5
    assert missing["objects"][1]["found"] is None and missing["color"] == 0.5

    # The matching is one-to-one: two prompted red circles need two detected ones.
    twice = "a large red circle at the top left and a large red circle at the top"
    assert judge.score(image, twice)["fraction"] == 0.5

    blank = np.full((32, 32, 3), shapes.BACKGROUND, np.uint8)
    nothing = judge.score(blank, shapes.parse_caption(prompt))
    assert nothing["num_detected"] == 0 and nothing["fraction"] == 0.0 and not nothing["exact"]


# ---------------------------------------------------------------------------------------------
# TFDS builder.
# ---------------------------------------------------------------------------------------------


def test_get_config_derives_named_variants():
    assert builders.get_config("default").image_size == 32
    assert builders.get_config("default", image_size=64).name == "default_64px"
    assert builders.get_config("default_64px", image_size=32).name == "default"
    assert builders.get_config("default_64px", seed=2).name == "default_64px_seed2"
    derived = builders.get_config("tiny", image_size=64, seed=3)
    assert (derived.name, derived.image_size, derived.seed) == ("tiny_64px_seed3", 64, 3)
    assert derived.num_train == builders.get_config("tiny").num_train
    with pytest.raises(ValueError):
        builders.get_config("huge")


def test_builder_round_trip(tmp_path):
    data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError):
        builders.data_source(data_dir, "train", config="tiny")
    builder = builders.build(data_dir, config="tiny")
    assert builder.name == "tfx_shapes" and builder.builder_config.name == "tiny"
    assert str(builder.info.version) == "1.0.0"
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert any(p.name.startswith("tfx_shapes-train.array_record") for p in files)
    mtimes = [p.stat().st_mtime_ns for p in files]

    config = builder.builder_config
    for split in shapes.SPLITS:
        source = builders.data_source(data_dir, split, config="tiny")
        expected = list(shapes.generate_examples(split, config.num_examples(split), 32, 0))
        assert len(source) == len(expected)
        read = [(i, source[i]) for i in range(len(source))]
        assert all(isinstance(r["text"], str) and isinstance(r["kind"], str) for _, r in read)
        _assert_same_examples(read, expected)

    # Building again reuses the files.
    builders.build(data_dir, config="tiny")
    assert [p.stat().st_mtime_ns for p in files] == mtimes


def test_sources_pickle_for_predefined_and_derived_configs(tmp_path):
    # Grain worker processes receive the source pickled; TFDS rebuilds the builder on unpickling.
    for image_size in (32, 64):  # "tiny" is predefined; "tiny_64px" is derived from it.
        builders.build(str(tmp_path), config="tiny", image_size=image_size)
        source = builders.data_source(str(tmp_path), "heldout", "tiny", image_size=image_size)
        clone = pickle.loads(pickle.dumps(source))
        (_, expected), *_ = shapes.generate_examples("heldout", 1, image_size)
        assert len(clone) == 64 and clone[0]["text"] == expected["text"]
        np.testing.assert_array_equal(clone[0]["images"][0], expected["images"][0])
