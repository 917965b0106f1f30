"""The Grain pipeline: exact layouts, no split images, determinism, host shards, resume."""

import numpy as np
import pytest

from tfx_jax.data import latents as latents_lib
from tfx_jax.data import pipeline
from tfx_jax.data.tokenizer import BOI_ID, BOS_ID, EOI_ID, EOS_ID

SPEC = pipeline.SequenceSpec(seq_len=24, patch_size=2, latent_channels=2)


def encode(text):  # a transparent "tokenizer": one id per word, 10 + word length
    return [10 + len(w) for w in text.split()]


def lat(value, size=4):
    return np.full((size, size, 2), value, np.float32)


def test_to_sequence_hand_example():
    ex = {"kind": "caption", "text": "a red dot", "latents": np.stack([lat(1.0)])}
    always_first = pipeline.SequenceSpec(24, 2, 2, caption_first_prob=1.0)
    seq = pipeline.to_sequence(ex, np.random.default_rng(0), encode, always_first)
    assert seq["tokens"].tolist() == [BOS_ID, 11, 13, 13, BOI_ID, 0, 0, 0, 0, EOI_ID, EOS_ID]
    assert seq["image_ids"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert seq["patches"].shape == (11, 8)
    np.testing.assert_array_equal(seq["patches"][5:9], 1.0)
    assert (seq["patches"][:5] == 0).all() and (seq["patches"][9:] == 0).all()
    never_first = pipeline.SequenceSpec(24, 2, 2, caption_first_prob=0.0)
    seq = pipeline.to_sequence(ex, np.random.default_rng(0), encode, never_first)
    assert seq["tokens"].tolist() == [BOS_ID, BOI_ID, 0, 0, 0, 0, EOI_ID, 11, 13, 13, EOS_ID]


def test_interleaved_and_truncation():
    ex = {
        "kind": "interleaved",
        "text": "first one <image> then two <image> end",
        "latents": np.stack([lat(1.0), lat(2.0)]),
    }
    seq = pipeline.to_sequence(ex, np.random.default_rng(0), encode, SPEC)
    # BOS 2 words [BOI 4 EOI] 2 words [BOI 4 EOI] 1 word EOS = 1+2+6+2+6+1+1 = 19
    assert len(seq["tokens"]) == 19 and seq["image_ids"].max() == 2
    short = pipeline.SequenceSpec(seq_len=12, patch_size=2, latent_channels=2, overlong="truncate")
    counters = pipeline.Counters()
    cut = pipeline.to_sequence(ex, np.random.default_rng(0), encode, short, counters)
    # The second image would be split: the cut falls before its BOI.
    assert cut["tokens"].tolist() == [BOS_ID, 15, 13, BOI_ID, 0, 0, 0, 0, EOI_ID, 14, 13]
    assert counters.truncated == 1
    drop = pipeline.SequenceSpec(seq_len=12, patch_size=2, latent_channels=2, overlong="drop")
    assert pipeline.to_sequence(ex, np.random.default_rng(0), encode, drop, counters) is None
    assert counters.overlong_dropped == 1


def make_source(n=200, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = ["caption", "interleaved", "text"][i % 3]
        k = {"caption": 1, "interleaved": 2, "text": 0}[kind]
        words = " ".join("w" * int(rng.integers(1, 6)) for _ in range(int(rng.integers(1, 6))))
        text = words if kind != "interleaved" else f"{words} <image> and <image> {i}"
        lats = (
            np.stack([lat(float(i % 7 + j + 1)) for j in range(k)]) if k else np.zeros((0, 4, 4, 2))
        )
        out.append({"kind": kind, "text": text, "latents": lats})
    return out


def batches(n, **kw):
    args = dict(batch_size=4, seed=3, num_packing_bins=8) | kw
    it = iter(pipeline.packed_dataset(make_source(), encode, SPEC, **args))
    return it, [next(it) for _ in range(n)]


def test_packed_rows_are_consistent():
    _, bs = batches(6)
    for b in bs:
        assert b["tokens"].shape == (4, 24) and b["patches"].shape == (4, 24, 8)
        for r in range(4):
            seg, img, tok, pos = (
                b[k][r] for k in ("segment_ids", "image_ids", "tokens", "positions")
            )
            # Documents are contiguous, start with BOS at position 0, padding at the end only.
            for s in set(seg[seg > 0].tolist()):
                idx = np.flatnonzero(seg == s)
                assert (np.diff(idx) == 1).all() and tok[idx[0]] == BOS_ID and pos[idx[0]] == 0
                assert (pos[idx] == np.arange(len(idx))).all() and tok[idx[-1]] == EOS_ID
                # No image is split: every image block is BOI + 4 patches + EOI inside the doc.
                for k in set(img[idx][img[idx] > 0].tolist()):
                    where = idx[img[idx] == k]
                    assert len(where) == 4 and tok[where[0] - 1] == BOI_ID
                    assert tok[where[-1] + 1] == EOI_ID
            assert (b["patches"][r][img == 0] == 0).all()
            assert (b["patches"][r][img > 0] != 0).any() or (img == 0).all()


def test_deterministic_and_seed_dependent():
    _, a = batches(4)
    _, b = batches(4)
    _, c = batches(4, seed=4)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any((x["tokens"] != z["tokens"]).any() for x, z in zip(a, c, strict=True))


def test_hosts_read_disjoint_data():
    src = [{"kind": "text", "text": f"id{i}", "latents": np.zeros((0, 4, 4, 2))} for i in range(40)]
    enc = lambda text: [100 + int(text[2:])]
    seen = []
    for host in range(2):
        ds = pipeline.packed_dataset(
            src,
            enc,
            SPEC,
            batch_size=1,
            num_epochs=1,
            seed=5,
            process_index=host,
            process_count=2,
            num_packing_bins=4,
        )
        seen.append({int(t) - 100 for b in ds for t in b["tokens"].ravel() if t >= 100})
    assert not seen[0] & seen[1], "two hosts read the same record"
    assert seen[0] | seen[1] == set(range(40))


def test_resume_sees_the_same_batches():
    it, _ = batches(3)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = iter(
        pipeline.packed_dataset(
            make_source(), encode, SPEC, batch_size=4, seed=3, num_packing_bins=8
        )
    )
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_bad_records_are_skipped_or_raise():
    src = make_source(30)
    src[4] = {"kind": "caption", "text": "x", "latents": np.zeros((2, 4, 4, 2))}  # 2 images
    counters = pipeline.Counters()
    ds = pipeline.packed_dataset(
        src, encode, SPEC, batch_size=1, num_epochs=1, shuffle=False, counters=counters
    )
    list(ds)
    assert counters.decode_errors == 1
    strict = pipeline.SequenceSpec(24, 2, 2, on_error="raise")
    with pytest.raises(ValueError, match="caption example has 2 images"):
        list(
            pipeline.packed_dataset(src, encode, strict, batch_size=1, num_epochs=1, shuffle=False)
        )


def test_latents_round_trip(tmp_path):
    examples = [{"images": [np.full((8, 8, 3), i * 10, np.uint8)] * (i % 3)} for i in range(7)]
    enc = latents_lib.pool_encoder(factor=2, channels=3)
    n = latents_lib.write_latents(
        tmp_path / "l.array_record", examples, enc, (4, 4, 3), batch_size=2, progress=False
    )
    assert n == sum(i % 3 for i in range(7))
    src = latents_lib.LatentSource(tmp_path / "l.array_record")
    assert len(src) == 7 and src[0].shape == (0, 4, 4, 3) and src[2].shape == (2, 4, 4, 3)
    np.testing.assert_allclose(src[5][1], enc(np.stack(examples[5]["images"]))[1], atol=1e-2)
    # Re-encoding (a retrained VAE) replaces the file.
    other = latents_lib.pool_encoder(factor=2, channels=3, seed=1)
    latents_lib.write_latents(
        tmp_path / "l.array_record", examples, other, (4, 4, 3), progress=False
    )
    again = latents_lib.LatentSource(tmp_path / "l.array_record")
    np.testing.assert_allclose(again[5][1], other(np.stack(examples[5]["images"]))[1], atol=1e-2)
    with pytest.raises(FileNotFoundError, match="python -m tfx_jax data latents"):
        latents_lib.LatentSource(tmp_path / "missing.array_record")
