"""The data stages for sources other than the embedded one: a folder of captioned images (with a
corrupt file and an uncaptioned one) and plain text files go through tokenizer → VAE → encode →
packed batches → training; stale stages are detected; bad examples are skipped and counted or
fail, by `data.on_error`."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from tfx_jax import artifacts, stages
from tfx_jax.train.loop import train

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}


def _folder(root, n_train=24, n_val=6):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("validation", n_val)):
        d = root / split
        d.mkdir(parents=True)
        for i in range(n):
            name = list(COLORS)[i % 3]
            image = np.full((40, 36, 3), 245, np.uint8)
            y, x = rng.integers(0, 20, 2)
            image[y : y + 16, x : x + 16] = COLORS[name]
            Image.fromarray(image).save(d / f"img_{i:03d}.png")
            (d / f"img_{i:03d}.txt").write_text(f"a {name} square\n")
    (root / "train" / "corrupt.png").write_bytes(b"\x89PNG not really")
    (root / "train" / "corrupt.txt").write_text("a broken picture")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "uncaptioned.png")
    return root


def _cfg(tiny_config, tmp_path, *overrides):
    return tiny_config(
        overrides=[
            f"data.data_dir={tmp_path / 'data'}",
            "vae.steps=2",
            "vae.batch_size=8",
            "vae.channels=8,16",
            *overrides,
        ]
    )


@pytest.mark.slow
def test_folder_source_prepares_skips_bad_files_and_trains(tiny_config, tmp_path):
    folder = _folder(tmp_path / "pics")
    cfg = _cfg(
        tiny_config,
        tmp_path,
        "data.source=folder",
        f"data.path={folder}",
        "train.steps=2",
        "train.log_every=1",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.eval_samples=2",
        "checkpoint.every_steps=2",
    )
    stages.prepare_all(cfg)
    made_by = json.loads((artifacts.encoded_path(cfg, "train").parent / "made_by.json").read_text())
    assert made_by["stats"]["train"]["skipped"] == 2  # corrupt.png and uncaptioned.png
    assert made_by["stats"]["train"]["images"] == 24
    assert made_by["stats"]["validation"]["images"] == 6
    assert artifacts.encoded_is_current(cfg)

    batch = next(artifacts.batches(cfg))
    assert batch["tokens"].shape == (8, 128) and (batch["image_ids"] > 0).any()
    # Encoding on the fly gives the same batches as the records precomputed once (latents to
    # float16 rounding: the VAE sees other batch sizes, so XLA may round differently).
    fly = _cfg(tiny_config, tmp_path, "data.source=folder", f"data.path={folder}")
    fly = dataclasses.replace(fly, data=dataclasses.replace(fly.data, latents="on_the_fly"))
    want = next(artifacts.batches(cfg, "validation", shuffle=False))
    got = next(artifacts.batches(fly, "validation", shuffle=False))
    assert (want["image_ids"] > 0).any()
    for key in ("tokens", "segment_ids", "positions", "image_ids"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_allclose(got["patches"], want["patches"], rtol=2e-3, atol=1e-6)
    history = train(cfg, tmp_path / "run")
    assert np.isfinite(history[-1]["loss"]) and history[-1]["eval/perplexity"] > 1
    assert "eval/judge_fraction" not in history[-1]  # only the shapes data has a judge
    assert list((tmp_path / "run" / "tensorboard").iterdir())

    # on_error=raise: the first bad file fails the encode stage, naming it.
    strict = _cfg(
        tiny_config, tmp_path, "data.source=folder", f"data.path={folder}", "data.on_error=raise"
    )
    with pytest.raises(ValueError, match=r"corrupt\.png"):
        stages.encode(strict)


def test_text_source_needs_no_vae_and_packs_text_only(tiny_config, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        paras = [f"Paragraph {j} of file {i} says something plain." for j in range(5)]
        (docs / f"f{i}.txt").write_text("\n\n".join(paras))
    cfg = _cfg(tiny_config, tmp_path, "data.source=text", f"data.path={docs}")
    stages.prepare_all(cfg)
    assert not (artifacts.vae_dir(cfg) / "vae.json").exists()
    batch = next(artifacts.batches(cfg))
    assert (batch["image_ids"] == 0).all() and (batch["segment_ids"] > 0).mean() > 0.5
    assert (batch["patches"] == 0).all()


def test_stale_records_are_detected(tiny_config, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Some words to learn a vocabulary from.\n\nAnd a second one.")
    cfg = _cfg(tiny_config, tmp_path, "data.source=text", f"data.path={docs}")
    with pytest.raises(FileNotFoundError, match="python -m tfx_jax data tokenizer"):
        artifacts.batches(cfg)
    stages.prepare_all(cfg)
    assert artifacts.encoded_is_current(cfg)
    # Another source in the same data_dir: the tokenizer and records are stale, and say so.
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.txt").write_text("Different text entirely.")
    cfg2 = _cfg(tiny_config, tmp_path, "data.source=text", f"data.path={other}")
    assert not artifacts.tokenizer_is_current(cfg2)
    with pytest.raises(FileNotFoundError, match="python -m tfx_jax data encode"):
        artifacts.batches(cfg2)
    stages.prepare_all(cfg2)
    assert artifacts.encoded_is_current(cfg2) and not artifacts.encoded_is_current(cfg)
