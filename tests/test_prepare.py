"""The data stages for sources other than the embedded one: a folder of captioned images (with a
corrupt file and an uncaptioned one) and plain text files go through tokenizer → VAE → encode →
packed batches → training; stale stages are detected; bad examples are skipped and counted or
fail, by `data.on_error`."""

import collections
import dataclasses
import json
import shutil

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
            "vae.channels=8",  # every level 8 wide: half the compile time of 8,16
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

    # on_error=raise: the first bad file fails the encode stage, naming it (records that are
    # current for these inputs are not encoded again, whatever on_error says: start afresh).
    shutil.rmtree(artifacts.made_by_path(cfg).parent)
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


def test_tfds_text_corpus_needs_no_vae_and_long_documents_continue_across_rows(
    tiny_config, tmp_path
):
    """A TFDS text dataset (`data.text_key`) through every stage: no VAE, text-only batches,
    and its ~6 KB document continues across rows (data.overlong=split) with no token lost."""
    from test_sources import CORPUS_LONG, TfxFakeCorpus

    tfds_dir = tmp_path / "tfds"
    TfxFakeCorpus(data_dir=str(tfds_dir), file_format="array_record").download_and_prepare()
    corpus = [
        "data.source=tfds",
        "data.tfds_name=tfx_fake_corpus",
        f"data.tfds_data_dir={tfds_dir}",
    ]
    cfg = _cfg(tiny_config, tmp_path, *corpus, "data.text_key=text")
    stages.prepare_all(cfg)
    assert not (artifacts.vae_dir(cfg) / "vae.json").exists()
    made_by = json.loads(artifacts.made_by_path(cfg).read_text())
    train = made_by["stats"]["train"]
    assert (train["examples"], train["skipped"]) == (7, 1)  # record 5 is empty
    assert train["overlong"]["split"] == 1 and train["overlong"]["truncated"] == 0
    long = artifacts.load_tokenizer(cfg).encode(CORPUS_LONG)
    assert len(long) > 2 * cfg.data.seq_len
    seen = collections.Counter()
    it = artifacts.batches(cfg, shuffle=False)
    for _ in range(8):  # more than a pass over the 7 documents
        batch = next(it)
        assert (batch["image_ids"] == 0).all()
        seen.update(batch["tokens"][batch["segment_ids"] > 0].tolist())
    # Every token of the long document reached a batch (tokens are counted, not positions).
    assert all(seen[t] >= n for t, n in collections.Counter(long).items())


def test_max_examples_bounds_every_stage_and_the_tokenizer_reads_a_sample(
    tiny_config, tmp_path, monkeypatch
):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"f{i:02d}.txt").write_text(
            "\n\n".join(f"File {i} part {j} " + "z" * 1200 for j in range(3))
        )
    cfg = _cfg(tiny_config, tmp_path, "data.source=text", f"data.path={docs}",
               "data.max_examples=4")  # fmt: skip
    stages.prepare_all(cfg)
    made_by = json.loads(artifacts.made_by_path(cfg).read_text())
    assert made_by["max_examples"] == 4
    assert [made_by["stats"][s]["examples"] for s in ("train", "validation")] == [4, 3]
    assert (
        json.loads((artifacts.tokenizer_path(cfg).parent / "tokenizer.json").read_text())[
            "max_examples"
        ]
        == 4
    )
    whole = _cfg(tiny_config, tmp_path, "data.source=text", f"data.path={docs}")
    assert not artifacts.tokenizer_is_current(whole) and not artifacts.encoded_is_current(whole)

    # The tokenizer's sample: data.tokenizer_sample texts (+ the stdlib docstrings); a text
    # longer than SentencePiece takes is cut into pieces, not skipped.
    seen = {}

    def capture(texts, vocab_size, **kw):
        seen["texts"] = list(texts)
        raise RuntimeError("captured")

    monkeypatch.setattr(stages, "train_tokenizer", capture)
    sample = _cfg(tiny_config, tmp_path, "data.source=text", f"data.path={docs}",
                  "data.tokenizer_sample=5")  # fmt: skip
    with pytest.raises(RuntimeError, match="captured"):
        stages.build_tokenizer(sample)
    assert sum(t.startswith("File ") for t in seen["texts"]) == 5
    long = "para " * 2000 + "\n\n" + "x" * 9000
    pieces = stages._sentences(long)
    assert all(len(p.encode()) <= 4192 for p in pieces)
    assert "".join(pieces).replace(" ", "") == long.replace(" ", "").replace("\n", "")
