"""The in-domain FD (`tfx_jax.eval.fd`): the distance against closed forms, the shapes
classifier (held-out accuracy on the tests' tier, cached, retrained when its stamp differs,
deterministic), and `fd_metrics` telling generated sets from real ones beside the noise floor.
The `eval` command's keys are checked in tests/test_evaluation.py, a judge without classifier
data in tests/test_eval_judge.py."""

from __future__ import annotations

import json
import types

import jax
import numpy as np
import pytest

from tfx_jax.config import Config
from tfx_jax.data.config import DataConfig
from tfx_jax.data.embedded import builders, judge, shapes
from tfx_jax.eval import fd, prompts

# The tier of the tests' shapes data (tests/conftest.py: data.tfds_config=tiny).
TINY = judge.ShapesJudge(builders.get_config("tiny").spec, 32)


# ----------------------------------------------------------------------------- distances


def test_fd_of_identical_sets_is_zero_and_grows_with_a_mean_shift():
    f = np.random.default_rng(0).normal(size=(500, 8))
    assert fd.frechet_distance(f, f) == pytest.approx(0, abs=1e-9)
    shifts = [fd.frechet_distance(f, f + d) for d in (0.5, 1.0, 2.0)]
    # A pure shift of every feature by d: |mu1 - mu2|² = 8 d², the covariances equal.
    np.testing.assert_allclose(shifts, [8 * 0.25, 8 * 1.0, 8 * 4.0], rtol=1e-9)
    # Fewer samples than features (rank-deficient covariances): still finite and >= 0.
    few = f[:5]
    assert fd.frechet_distance(few, few) == pytest.approx(0, abs=1e-9)
    assert fd.frechet_distance(few, f[5:10]) > 0


def test_fd_matches_the_closed_form_for_known_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    # Diagonal covariances commute: tr(c1 + c2 - 2 (c1 c2)^½) = sum (s1 - s2)².
    s1, s2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([0.5, 1.0, 2.0, 3.0])
    want = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    got = fd.gaussian_fd(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    assert got == pytest.approx(want, rel=1e-12)
    # Rotated (non-diagonal) covariances: the FD is invariant under a common rotation.
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    rotated = fd.gaussian_fd(q @ mu1, q @ np.diag(s1**2) @ q.T, q @ mu2, q @ np.diag(s2**2) @ q.T)
    assert rotated == pytest.approx(want, rel=1e-9)
    # Fitted to samples of those Gaussians: close to the closed form.
    a = mu1 + rng.normal(size=(20000, 4)) * s1
    b = mu2 + rng.normal(size=(20000, 4)) * s2
    assert fd.frechet_distance(a, b) == pytest.approx(want, rel=0.05)
    assert fd.noise_floor(a, b) == fd.frechet_distance(a, b)


def test_diversity_is_the_mean_pairwise_distance():
    assert fd.diversity(np.zeros((5, 3))) == 0.0
    square = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float)  # 4 sides 1, 2 diagonals √2
    assert fd.diversity(square) == pytest.approx((4 + 2 * np.sqrt(2)) / 6)


# ----------------------------------------------------------------------------- the classifier


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """The classifier of the tiny tier at the production settings, trained once."""
    directory = tmp_path_factory.mktemp("fd_classifier")
    return directory, fd.load_or_train(TINY, directory)


def test_the_classifier_learns_the_tests_tier_and_is_cached(tiny_classifier):
    directory, first = tiny_classifier
    assert first.trained
    stamp = first.stamp
    # 27 labels per image (shape, colour, size in each of the 9 cells): nearly all right, and
    # most images with every one of them right (the multi-object tier, up to 3 small objects).
    assert stamp["accuracy"] > 0.99 and stamp["exact"] > 0.8, stamp
    assert stamp["settings"]["world"] == f"{TINY.spec!r} at 32px"
    print(
        f"tiny tier: {stamp['accuracy']:.4f} labels, {stamp['exact']:.4f} images, "
        f"{stamp['seconds']} s"
    )
    again = fd.load_or_train(TINY, directory)
    assert not again.trained and again.stamp == stamp
    flat = lambda p: [np.asarray(x) for x in jax.tree.leaves(p)]
    for x, y in zip(flat(first.params), flat(again.params), strict=True):
        np.testing.assert_array_equal(x, y)
    f = again.features(TINY.classifier_data(4, 9).images)
    assert f.shape == (4, fd.FEATURES) and np.isfinite(f).all()


def test_a_changed_stamp_retrains_and_training_is_deterministic(tmp_path):
    few = dict(steps=5)
    first = fd.load_or_train(TINY, tmp_path, **few)
    assert first.trained and not fd.load_or_train(TINY, tmp_path, **few).trained
    (where,) = tmp_path.iterdir()  # one directory per world, replaced in place
    stamp_path = where / "stamp.json"
    stamp = json.loads(stamp_path.read_text())
    stamp["settings"]["test_images"] = "something else"  # e.g. the renderer changed
    stamp_path.write_text(json.dumps(stamp))
    assert fd.load_or_train(TINY, tmp_path, **few).trained
    other = fd.load_or_train(TINY, tmp_path, steps=6)  # other settings: retrained
    assert other.trained and other.stamp["settings"]["steps"] == 6
    assert [p.name for p in tmp_path.iterdir()] == [where.name]
    # Two trainings from the same data and seed: the same params, bit for bit.
    data = TINY.classifier_data(128, 0)
    (_, a, _), (_, b, _) = (fd.train_classifier(data, data, steps=5) for _ in range(2))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_judge_without_classifier_data_has_no_classifier(tmp_path):
    class NoData:
        def classifier_data(self, num, seed):
            return None

    assert fd.load_or_train(NoData(), tmp_path) is None


# ----------------------------------------------------------------------------- fd_metrics


class _Split:
    """A split of caption examples of the tiny tier (what `caption_examples` reads)."""

    def __init__(self, split: str, num: int):
        self.examples = [
            {"kind": "caption", "text": shapes.caption(s), "images": [shapes.render(s, 32)]}
            for s in (
                shapes.sample_scene(shapes.example_rng(7, split, i), split, TINY.spec)
                for i in range(num)
            )
        ]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def test_fd_metrics_tell_generated_from_real_beside_the_floor(tiny_classifier, monkeypatch):
    directory, _ = tiny_classifier
    monkeypatch.setattr(fd, "classifier_dir", lambda cfg: directory)
    cfg = Config(data=DataConfig(image_size=32))
    splits = {s: _Split(s, 160) for s in ("train", "heldout")}
    source = types.SimpleNamespace(open_split=lambda cfg, split: splits[split])
    num = 64  # `eval`'s default
    examples = [ex for s in splits for ex in prompts.caption_examples(cfg, source, s, num, seed=0)]
    prompting = types.SimpleNamespace(
        judge=TINY, splits=tuple(splits), examples=examples, source=source
    )
    blank = np.full((32, 32, 3), shapes.BACKGROUND, np.uint8)
    one = examples[0].image
    for name, draw in (
        ("perfect", lambda ex: ex.image),  # draws each caption's true image
        ("blank", lambda ex: blank),  # draws nothing
        ("collapsed", lambda ex: one),  # draws one image for every caption
    ):
        drawn = [prompts.Drawn(ex, draw(ex), None) for ex in examples]
        m, info = fd.fd_metrics(cfg, prompting, drawn, seed=0)
        assert info["samples"] == {"train": num, "heldout": num}
        assert info["what"] == "in-domain FD (shapes classifier features, not ImageNet FID)"
        for s in splits:
            fd_, floor = m[f"eval/fd/{s}"], m[f"eval/fd_floor/{s}"]
            gen, real = m[f"eval/diversity/{s}"], m[f"eval/diversity_real/{s}"]
            assert floor > 0 and real > 0
            if name == "perfect":  # the real images: the floor exactly, the same diversity
                assert fd_ == pytest.approx(floor) and gen == pytest.approx(real)
            else:  # one image for every caption: no diversity, far from real
                assert fd_ > 2 * floor and gen == 0.0, (name, s, fd_, floor)
