"""Mixtures of sources (data.source=mixture): the configured share of tokens is what the
pipeline delivers, its position resumes exactly, and a mixture trains end to end with
per-source counts and evaluation."""

import json
import shutil

import numpy as np
import pytest
from conftest import REPO

from tfx_jax import stages
from tfx_jax.config import ConfigError, load_config, validate
from tfx_jax.data import encoded, pipeline, sequence
from tfx_jax.data.sources import mixture
from tfx_jax.train.loop import train

SPEC = sequence.SequenceSpec(seq_len=32, patch_size=2, latent_channels=2)


def text(n_words: int, i: int) -> encoded.Record:
    ex = {"kind": "text", "text": " ".join(f"w{i}" for _ in range(n_words))}
    return encoded.encode_example(ex, lambda t: [7] * len(t.split()), (4, 4, 2))


def caption(i: int) -> encoded.Record:
    ex = {"kind": "caption", "text": "a b c", "latents": np.ones((1, 4, 4, 2), np.float32)}
    return encoded.encode_example(ex, lambda t: [7] * len(t.split()), (4, 4, 2))


def mixed(weights, by, **kw):
    docs = [text(20, i) for i in range(50)]  # 22 positions each
    caps = [caption(i) for i in range(30)]  # BOS, 3 words, BOI, 4 patches, EOI, EOS: 11
    source = mixture.Concat([docs, caps], ["docs", "caps"])
    parts = [
        pipeline.MixturePart("docs", 0, 50, weights[0]),
        pipeline.MixturePart("caps", 50, 30, weights[1]),
    ]
    args = dict(batch_size=4, seed=1, num_packing_bins=8, parts=parts, mix_by=by) | kw
    return pipeline.packed_dataset(source, SPEC, **args)


def shares(batches, what="tokens"):
    total = {n: sum(int(b[f"stats/{n}/{what}"]) for b in batches) for n in ("docs", "caps")}
    return {n: v / sum(total.values()) for n, v in total.items()}


def test_the_delivered_mix_matches_the_configured_one():
    it = iter(mixed((0.3, 0.7), "tokens"))
    batches = [next(it) for _ in range(300)]
    got = shares(batches)
    assert abs(got["caps"] - 0.7) < 0.02, got  # by tokens, within 2%
    # The counts are what the rows hold: caption sequences carry one image each.
    assert sum(int(b["stats/caps/images"]) for b in batches) == sum(
        int(b["stats/caps/sequences"]) for b in batches
    )
    for b in batches[:5]:  # and the stats match the rows themselves
        assert (
            int(b["stats/caps/tokens"]) + int(b["stats/docs/tokens"])
            == (b["segment_ids"] > 0).sum()
        )
    it = iter(mixed((1.0, 1.0), "examples"))
    by_examples = shares([next(it) for _ in range(300)], "sequences")
    assert abs(by_examples["caps"] - 0.5) < 0.03, by_examples


def test_a_mixture_resumes_exactly():
    it = iter(mixed((0.5, 0.5), "tokens"))
    for _ in range(7):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(5)]
    again = iter(mixed((0.5, 0.5), "tokens"))
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(5)], strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize(
    "entry, message",
    [
        ("text", "write 'NAME WEIGHT key=value"),
        ("text 0 source=text", "weight '0' must be a finite number > 0"),
        ("text inf source=text path=x", "weight 'inf' must be a finite number > 0"),
        ("text nan source=text path=x", "weight 'nan' must be a finite number > 0"),
        ("text -2 source=text path=x", "weight '-2' must be a finite number > 0"),
        ("text 1 source=text path=x max_examples=0", "max_examples=0 must be >= 1 when set"),
        ("text 1 source=text colour=red", "'colour=red' is not KEY=VALUE"),
        ("text 1 path=x", "needs source=NAME"),
        ("text 1 source=text image_size=big", "image_size='big' is not a int"),
    ],
)
def test_bad_mixture_entries_say_what_is_wrong(entry, message):
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(
            REPO / "experiments/tiny.py", ["data.source=mixture", f"data.mixture={entry}"]
        )
        validate(cfg)


@pytest.mark.slow
def test_a_text_and_image_mixture_trains(tmp_path, fast_compile):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):  # 5% of the files (by name hash) are the validation split
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "some plain words here. " * 20)
    overrides = [
        f"data.data_dir={tmp_path / 'data'}",
        "data.source=mixture",
        f"data.mixture=shapes 0.5 source=shapes tfds_config=tiny,"
        f"text 0.5 source=text path={corpus}",
        "data.seq_len=128",
        "data.global_batch_size=8",
        "data.packing_bins=8",
        "model.vocab_size=512",
        "model.d_model=64",
        "model.n_layers=2",
        "vae.steps=2",
        "vae.batch_size=16",
        "vae.channels=16,32",
        "train.steps=4",
        "train.log_every=4",
        "train.eval_every=4",
        "train.eval_batches=1",
        "train.eval_samples=0",
        "checkpoint.every_steps=2",
    ]
    cfg = load_config(REPO / "experiments/demo.py", overrides)
    stages.prepare_all(cfg)
    (last,) = train(cfg, tmp_path / "run")
    for name in ("shapes", "text"):
        assert 0 < last[f"data/{name}/token_share"] < 1 and last[f"data/{name}/tokens"] > 0
        assert np.isfinite(last[f"eval/{name}/lm_loss"])
    assert last["data/shapes/images"] > 0 and last["data/text/images"] == 0
    logged = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert any("data/text/token_share" in x for x in logged)
    # Killed after step 2's checkpoint: the resumed run's step 4 is the uninterrupted one's
    # (the mixture's position is part of the saved Grain state).
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed/checkpoints/4")
    (again,) = train(cfg, tmp_path / "resumed")
    assert again["step"] == 4 and again["loss"] == last["loss"]
