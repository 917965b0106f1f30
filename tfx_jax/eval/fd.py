"""An in-domain image metric independent of the judge: a Fréchet distance on the features of a
small classifier trained on the source's own world — "in-domain FD (<world> classifier
features, not ImageNet FID)" wherever it is printed.

No ImageNet Inception is available (no pretrained weights can be downloaded, and no installable
package ships them), and it would not know the source's world anyway. So the source's judge
renders labelled images of its world (`Judge.classifier_data`, `data.judging.LabelledImages`:
the shapes world labels the shape, colour and size in each grid cell), `FeatureNet` learns
them (CPU, seconds; cached under DATA_DIR/fd_classifier/), and its penultimate layer is the
feature space. What `eval` reports per prompt split (`fd_metrics`), on n = the prompts drawn
(`--num-prompts`), with the same n everywhere:

  eval/fd/<split>              FD(generated images of prompts A, real images of examples B)
  eval/fd_floor/<split>        FD(real images of A, real images of B): the noise floor, what
                               n samples of the real distribution score; at or below it the
                               generated set cannot be told from real data at this n
  eval/diversity/<split>       mean pairwise feature distance of the generated images
  eval/diversity_real/<split>  the same of A's real images (a collapsed generator: far below)

A = the split's prompt examples, B = the next n examples of the same split (disjoint from A:
`prompts.caption_examples` with 2n gives A first), so both FDs compare a set for A's captions
against the same reference B and differ only in whether A's images are generated or real.
(A second rendering of A's captions would not do for the shapes world: a caption fixes its
image, so real vs real would be 0.) Only examples the judge's grammar reads are used (a
mixture's other captions belong to other worlds).

    frechet_distance(a_NF, b_MF)    FD of Gaussians fitted to two feature sets
    noise_floor(real_a, real_b)     the same, named for what it measures
    diversity(f_NF)                 mean pairwise L2 distance
    load_or_train(judge, directory) the cached classifier (trained when its stamp differs)
    fd_metrics(cfg, prompting, drawn, seed) -> (metrics, info)   what `eval` adds

Shape legend: B batch, S image side, F features, L logits (all heads), K heads, N/M samples.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import serialization

from tfx_jax import artifacts
from tfx_jax.config import Config
from tfx_jax.data.judging import Judge, LabelledImages
from tfx_jax.eval.prompts import Drawn, Prompting, caption_examples

log = logging.getLogger("tfx_jax")

# What the classifier is trained from and how; every entry is stamped (`_settings`).
# On the shapes world's multi-object tier (9 cells x shape, colour, size), 64 features held
# 84% of the held-out objects right after these steps, 128 94%, 256 96% (2 CPU cores, ~30 s
# each under load): 128, since the FD fits a 128 x 128 covariance to n samples (n = 64 by
# default: rank-deficient, which the floor beside it accounts for).
FEATURES = 128
WIDTHS = (32, 64, 64)  # conv widths, each of stride 2
NUM_TRAIN = 4096
NUM_TEST = 1024
STEPS = 800
BATCH = 64
LEARNING_RATE = 3e-3  # Adam, cosine decay to 0 over STEPS
SEED = 0  # init, batch order, and the train set's scenes (the test set's: SEED + 1)
FORMAT = 1  # bump when the network or the training changes in a way not stamped here
WHAT = "in-domain FD ({} classifier features, not ImageNet FID)"


# ----------------------------------------------------------------------------- distances


def _gaussian(f_NF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(f_NF, np.float64)
    return f.mean(0), np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix (eigenvalues below 0 from rounding
    clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def gaussian_fd(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein²) distance of N(mu1, cov1) and N(mu2, cov2) (Dowson & Landau
    1982; FID, Heusel et al. 2017, eq. 6): |mu1 - mu2|² + tr(cov1 + cov2 - 2 (cov1 cov2)^½).

    tr (cov1 cov2)^½ is computed as tr (cov1^½ cov2 cov1^½)^½, the same eigenvalues but of a
    symmetric PSD matrix, so two `eigh`s replace a general matrix square root (scipy's sqrtm)
    and no complex parts or negative roots come from rounding, even for the rank-deficient
    covariances of fewer samples than features.
    """
    root1 = _psd_sqrt(cov1)
    inner = root1 @ cov2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    fd = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * cross
    return float(max(fd, 0.0))


def frechet_distance(a_NF: np.ndarray, b_MF: np.ndarray) -> float:
    """FD of the Gaussians fitted (mean, unbiased covariance) to two feature sets (>= 2 rows)."""
    return gaussian_fd(*_gaussian(a_NF), *_gaussian(b_MF))


def noise_floor(real_a: np.ndarray, real_b: np.ndarray) -> float:
    """FD of two disjoint sets of real features of the same size as the generated set: what
    sampling alone scores at that size (an FD at or below it says nothing more)."""
    return frechet_distance(real_a, real_b)


def diversity(f_NF: np.ndarray) -> float:
    """Mean L2 distance over all pairs of rows (i < j)."""
    f = np.asarray(f_NF, np.float64)
    n = len(f)
    if n < 2:
        return 0.0
    # Row by row from the differences (not |a|² + |b|² - 2ab: equal rows give exactly 0).
    total = sum(np.linalg.norm(f[i + 1 :] - f[i], axis=1).sum() for i in range(n - 1))
    return float(total / (n * (n - 1) / 2))


# ----------------------------------------------------------------------------- classifier


class FeatureNet(nn.Module):
    """3x3 convs of stride 2 (each halves the image: 32 px → 4x4) with ReLUs → flatten →
    Dense(features) → ReLU → one softmax head per label. Flattened, not globally pooled: where
    an object is is one of its labels.

    Returns (features_BF, logits_BKC): features = the Dense layer's output (before its ReLU);
    logits of every head padded to the widest (C = max(classes); `_head_losses` masks the
    padding), so the K heads are one tensor, not K slices.
    """

    classes: tuple[int, ...]
    features: int = FEATURES
    widths: tuple[int, ...] = WIDTHS

    @nn.compact
    def __call__(self, images_BSS3: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = images_BSS3.astype(jnp.float32) / 127.5 - 1.0
        for width in self.widths:
            x = nn.relu(nn.Conv(width, (3, 3), strides=2)(x))
        features_BF = nn.Dense(self.features)(x.reshape(x.shape[0], -1))
        K, C = len(self.classes), max(self.classes)
        logits = nn.Dense(K * C)(nn.relu(features_BF))
        return features_BF, logits.reshape(-1, K, C)


def _head_losses(logits_BKC: jax.Array, labels_BK: jax.Array, classes: Sequence[int]):
    """(cross-entropy per image averaged over heads [B], correct per head [B, K]); a head's
    classes past its own count are masked out."""
    valid_KC = np.arange(max(classes))[None, :] < np.asarray(classes)[:, None]
    logits = jnp.where(valid_KC, logits_BKC, -1e9)
    losses_BK = optax.softmax_cross_entropy_with_integer_labels(logits, labels_BK)
    return losses_BK.mean(1), logits.argmax(-1) == labels_BK


@dataclasses.dataclass
class Classifier:
    """A trained `FeatureNet` and its stamp (`_settings` + held-out accuracy, training time).
    `trained`: trained by this call (False: loaded from the cache)."""

    net: FeatureNet
    params: Any
    stamp: dict
    trained: bool

    @functools.cached_property
    def _apply(self):
        return jax.jit(self.net.apply)

    def features(self, images_BSS3: np.ndarray, chunk: int = 256) -> np.ndarray:
        """Feature vectors [B, F] (float64) of uint8 images, on the host CPU."""
        apply = self._apply
        with jax.default_device(_device()):
            out = [
                np.asarray(apply(self.params, images_BSS3[i : i + chunk])[0], np.float64)
                for i in range(0, len(images_BSS3), chunk)
            ]
        return np.concatenate(out) if out else np.zeros((0, self.net.features))


def _device() -> jax.Device:
    """The host CPU when this jax has it (training and features are then the same numbers on
    any accelerator, and never touch the run's devices); else the default device."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return jax.devices()[0]


def _fingerprint(data: LabelledImages) -> str:
    h = hashlib.sha256(np.ascontiguousarray(data.images).tobytes())
    h.update(np.ascontiguousarray(data.labels, np.int64).tobytes())
    return h.hexdigest()[:16]


def _settings(test: LabelledImages, steps: int, seed: int) -> dict:
    """What a classifier is trained from (the stamp's part that must match to reuse it)."""
    return {
        "format": FORMAT,
        "name": test.name,
        "world": test.world,
        "classes": list(test.classes),
        "image_size": int(test.images.shape[1]),
        "test_images": _fingerprint(test),  # the renderer and labels, as they are now
        "num_train": NUM_TRAIN,
        "num_test": len(test.images),
        "steps": steps,
        "batch": BATCH,
        "learning_rate": LEARNING_RATE,
        "schedule": "cosine",
        "seed": seed,
        "features": FEATURES,
        "widths": list(WIDTHS),
    }


def _cosine(step: int, steps: int) -> float:
    """The learning rate at `step`: `LEARNING_RATE` decayed to 0 over `steps` (cosine)."""
    return LEARNING_RATE * 0.5 * (1 + np.cos(np.pi * min(step / max(steps, 1), 1.0)))


@functools.cache
def _programs(net: FeatureNet):
    """The jitted train step (Adam; the learning rate an argument, so any step count runs
    the same compiled step) and the held-out check, once per network shape."""
    adam = optax.scale_by_adam()

    def loss(params, images, labels):
        return _head_losses(net.apply(params, images)[1], labels, net.classes)[0].mean()

    @jax.jit
    def step(params, opt_state, images, labels, lr):
        grads = jax.grad(loss)(params, images, labels)
        updates, opt_state = adam.update(grads, opt_state, params)
        return jax.tree.map(lambda p, u: p - lr * u, params, updates), opt_state

    @jax.jit
    def correct(params, images, labels):
        return _head_losses(net.apply(params, images)[1], labels, net.classes)[1]

    return adam, step, correct


def train_classifier(
    train: LabelledImages, test: LabelledImages, steps: int = STEPS, seed: int = SEED
) -> tuple[FeatureNet, Any, dict]:
    """Trains a `FeatureNet` on `train` (Adam, cosine-decayed learning rate, batches of `BATCH`
    in an order drawn from `seed`) on the host CPU, deterministically: the same data and seed
    give the same params.

    Returns:
      (net, params, {"accuracy": share of the test set's labels right, "exact": share of
      test images with every label right, "seconds": training time, compiling included}).
    """
    net = FeatureNet(tuple(train.classes), FEATURES, WIDTHS)
    adam, step, correct = _programs(net)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    n = len(train.images)
    with jax.default_device(_device()):
        params = net.init(jax.random.key(seed), train.images[:1])
        opt_state = adam.init(params)
        order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * BATCH // n))])
        for s in range(steps):
            idx = order[s * BATCH : (s + 1) * BATCH]
            lr = np.float32(_cosine(s, steps))
            params, opt_state = step(params, opt_state, train.images[idx], train.labels[idx], lr)
        right = np.concatenate(
            [
                np.asarray(correct(params, test.images[i : i + 256], test.labels[i : i + 256]))
                for i in range(0, len(test.images), 256)
            ]
        )
        params = jax.tree.map(np.asarray, params)
    seconds = time.perf_counter() - start
    scores = {
        "accuracy": float(right.mean()),
        "exact": float(right.all(1).mean()),
        "seconds": round(seconds, 2),
    }
    return net, params, scores


def _write_atomic(path: epath.Path, data: bytes) -> None:
    """Other processes (and xdist workers) may train the same classifier at once: each writes
    its own temporary file and renames it into place; the contents are the same."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{jax.process_index()}.tmp"
    tmp.write_bytes(data)
    tmp.replace(path)


def load_or_train(
    judge: Judge, directory: str | epath.PathLike, *, steps: int | None = None, seed: int = SEED
) -> Classifier | None:
    """The classifier of the judge's world: one directory per world
    (`directory/<name>_<S>px_<hash of the world>/`, so a data dir's tiers keep one each),
    loaded when its stamp (stamp.json) says it was trained from exactly what it would be
    trained from now (`_settings`), else trained and saved there (params.msgpack,
    flax.serialization), replacing what was. None when the judge has no classifier data.

    The held-out set is rendered every call (1024 scenes, ~0.3 s) and fingerprinted into the
    stamp, so a change to the renderer or the labels retrains, not only a change of tier.
    """
    steps = STEPS if steps is None else steps
    test = judge.classifier_data(NUM_TEST, seed + 1)
    if test is None:
        return None
    settings = _settings(test, steps, seed)
    key = hashlib.sha256(test.world.encode()).hexdigest()[:10]
    where = epath.Path(directory) / f"{test.name}_{settings['image_size']}px_{key}"
    net = FeatureNet(tuple(test.classes), FEATURES, WIDTHS)
    stamp_path, params_path = where / "stamp.json", where / "params.msgpack"
    if stamp_path.exists() and params_path.exists():
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("settings") == settings:
            params = serialization.msgpack_restore(params_path.read_bytes())
            return Classifier(net, params, stamp, trained=False)
    log.info("eval: training the in-domain FD classifier (%s) into %s", test.world, where)
    train = judge.classifier_data(NUM_TRAIN, seed)
    net, params, scores = train_classifier(train, test, steps, seed)
    stamp = {"settings": settings, **scores}
    log.info(
        "eval: FD classifier held-out accuracy %.2f%% (every label of an image right %.2f%%), "
        "trained in %.1f s",
        100 * scores["accuracy"],
        100 * scores["exact"],
        scores["seconds"],
    )
    where.mkdir(parents=True, exist_ok=True)
    _write_atomic(params_path, serialization.msgpack_serialize(params))
    _write_atomic(stamp_path, json.dumps(stamp, indent=1).encode())
    return Classifier(net, params, stamp, trained=True)


# ----------------------------------------------------------------------------- the metric


def classifier_dir(cfg: Config) -> epath.Path:
    return artifacts.data_dir(cfg) / "fd_classifier"


def fd_metrics(
    cfg: Config, prompting: Prompting, drawn: Sequence[Drawn], seed: int = 0
) -> tuple[dict[str, float], dict | None]:
    """eval/fd, eval/fd_floor, eval/diversity, eval/diversity_real per prompt split (module
    docstring) for the images `prompting` drew, and what eval.json records about them (None,
    with no metrics, when the source's judge has no classifier data).

    `seed` is the one the prompt examples were drawn with (`Prompting(cfg, num, seed)`): the
    reference examples B are the next ones of the same draw.
    """
    judge = prompting.judge
    if judge is None or not drawn:
        return {}, None
    classifier = load_or_train(judge, classifier_dir(cfg))
    if classifier is None:
        return {}, None
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    for split in prompting.splits:
        # A = the split's k prompt examples; the first k of a draw of 2k are they (by
        # `caption_examples`' construction), so the rest are B, disjoint from A.
        k = sum(ex.split == split for ex in prompting.examples)
        more = caption_examples(cfg, prompting.source, split, 2 * k, seed)[k:]
        ref = [ex.image for ex in more if judge.parse(ex.text) is not None]
        mine = [
            d
            for d in drawn
            if d.example.split == split and d.image is not None and judge.parse(d.example.text)
        ]
        n = min(len(mine), len(ref))
        if n < 2:
            log.info("eval: no in-domain FD for %s (%d samples; it needs 2)", split, n)
            continue
        gen = np.stack([d.image for d in mine[:n]])
        real = np.stack([d.example.image for d in mine[:n]])
        f_gen, f_real, f_ref = np.split(
            classifier.features(np.concatenate([gen, real, np.stack(ref[:n])])), 3
        )
        metrics[f"eval/fd/{split}"] = frechet_distance(f_gen, f_ref)
        metrics[f"eval/fd_floor/{split}"] = noise_floor(f_real, f_ref)
        metrics[f"eval/diversity/{split}"] = diversity(f_gen)
        metrics[f"eval/diversity_real/{split}"] = diversity(f_real)
        counts[split] = n
    settings = classifier.stamp["settings"]
    info = {
        "what": WHAT.format(settings["name"]),
        "samples": counts,
        "classifier": {
            "world": settings["world"],
            "accuracy": classifier.stamp["accuracy"],
            "exact": classifier.stamp["exact"],
            "seconds": classifier.stamp["seconds"],
            "trained_now": classifier.trained,
            "features": settings["features"],
        },
    }
    return metrics, info
