"""The Grain pipeline: exact layouts, no split images, over-long examples (continued, cut,
counted), determinism, host shards, resume."""

import dataclasses

import numpy as np
import pytest

from tfx_jax.data import encoded, pipeline, sequence, sources
from tfx_jax.data.tokenizer import BOI_ID, BOS_ID, EOI_ID, EOS_ID
from tfx_jax.models.mask import attention_mask

SequenceSpec = sequence.SequenceSpec
SPEC = SequenceSpec(seq_len=24, patch_size=2, latent_channels=2)


def encode(text):  # a transparent "tokenizer": one id per word, 10 + word length
    return [10 + len(w) for w in text.split()]


def lat(value, size=4):
    return np.full((size, size, 2), value, np.float32)


def enc(example, text_encoder=encode):
    return encoded.encode_example(example, text_encoder, (4, 4, 2))


def test_to_sequence_hand_example():
    ex = {"kind": "caption", "text": "a red dot", "latents": np.stack([lat(1.0)])}
    always_first = sequence.SequenceSpec(24, 2, 2, caption_first_prob=1.0)
    (seq,) = sequence.to_sequence(enc(ex), np.random.default_rng(0), always_first)
    assert seq["tokens"].tolist() == [BOS_ID, 11, 13, 13, BOI_ID, 0, 0, 0, 0, EOI_ID, EOS_ID]
    assert seq["image_ids"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert seq["patches"].shape == (11, 8)
    np.testing.assert_array_equal(seq["patches"][5:9], 1.0)
    assert (seq["patches"][:5] == 0).all() and (seq["patches"][9:] == 0).all()
    never_first = sequence.SequenceSpec(24, 2, 2, caption_first_prob=0.0)
    (seq,) = sequence.to_sequence(enc(ex), np.random.default_rng(0), never_first)
    assert seq["tokens"].tolist() == [BOS_ID, BOI_ID, 0, 0, 0, 0, EOI_ID, 11, 13, 13, EOS_ID]


def test_interleaved_and_truncation():
    ex = {
        "kind": "interleaved",
        "text": "first one <image> then two <image> end",
        "latents": np.stack([lat(1.0), lat(2.0)]),
    }
    (seq,) = sequence.to_sequence(enc(ex), np.random.default_rng(0), SPEC)
    # BOS 2 words [BOI 4 EOI] 2 words [BOI 4 EOI] 1 word EOS = 1+2+6+2+6+1+1 = 19
    assert len(seq["tokens"]) == 19 and seq["image_ids"].max() == 2
    counters = sequence.Counters()
    for policy in ("split", "truncate"):  # An interleaved document is cut under both.
        short = sequence.SequenceSpec(seq_len=12, patch_size=2, latent_channels=2, overlong=policy)
        (cut,) = sequence.to_sequence(enc(ex), np.random.default_rng(0), short, counters)
        # The second image would be split: the cut falls before its BOI.
        assert cut["tokens"].tolist() == [BOS_ID, 15, 13, BOI_ID, 0, 0, 0, 0, EOI_ID, 14, 13]
        assert cut["image_ids"].max() == 1 and cut["patches"].shape == (11, 8)
    assert (counters.overlong, counters.truncated) == (2, 2)
    drop = sequence.SequenceSpec(seq_len=12, patch_size=2, latent_channels=2, overlong="drop")
    assert sequence.to_sequence(enc(ex), np.random.default_rng(0), drop, counters) == []
    assert (counters.overlong, counters.overlong_dropped, counters.lost) == (3, 1, 1)


def numbered(text):  # a "tokenizer" giving word "w<i>" the id 100 + i
    return [100 + int(w[1:]) for w in text.split()]


def test_overlong_text_continues_across_rows_or_is_cut():
    ex = enc({"kind": "text", "text": " ".join(f"w{i}" for i in range(30))}, numbered)
    counters = sequence.Counters()
    # BOS, 30 words, EOS = 32 positions at seq_len 12: pieces of 12, 12 and 8.
    seqs = sequence.to_sequence(ex, np.random.default_rng(0), SequenceSpec(12, 2, 2), counters)
    assert [len(s["tokens"]) for s in seqs] == [12, 12, 8]
    joined = np.concatenate([s["tokens"] for s in seqs]).tolist()
    assert joined == [BOS_ID, *range(100, 130), EOS_ID]  # No token is lost.
    assert [s["tokens"][0] == BOS_ID for s in seqs] == [True, False, False]
    assert [s["tokens"][-1] == EOS_ID for s in seqs] == [False, False, True]
    for s in seqs:
        assert (s["image_ids"] == 0).all() and s["patches"].shape == (len(s["tokens"]), 8)
    assert (counters.overlong, counters.split, counters.truncated, counters.lost) == (1, 1, 0, 0)
    cut = SequenceSpec(12, 2, 2, overlong="truncate")
    (seq,) = sequence.to_sequence(ex, np.random.default_rng(0), cut, counters)
    assert seq["tokens"].tolist() == [BOS_ID, *range(100, 111)]
    assert (counters.overlong, counters.truncated) == (2, 1)
    counters.examples = 5
    assert counters.overlong_summary(12) == (
        "2 of 5 examples are longer than data.seq_len=12: 1 continued across rows, 1 truncated, "
        "0 dropped, 0 cannot fit"
    )


def test_overlong_caption_keeps_its_image():
    ex = enc({"kind": "caption", "text": " ".join(["word"] * 10), "latents": np.stack([lat(2.0)])})
    counters = sequence.Counters()
    # BOS, 10 words, BOI, 4 patches, EOI, EOS = 18 positions at seq_len 12.
    first = SequenceSpec(12, 2, 2, caption_first_prob=1.0)
    (seq,) = sequence.to_sequence(ex, np.random.default_rng(0), first, counters)
    assert seq["tokens"].tolist() == [BOS_ID, 14, 14, 14, 14, BOI_ID, 0, 0, 0, 0, EOI_ID, EOS_ID]
    np.testing.assert_array_equal(seq["patches"][6:10], 2.0)
    for policy in ("split", "truncate"):
        after = SequenceSpec(12, 2, 2, caption_first_prob=0.0, overlong=policy)
        (seq,) = sequence.to_sequence(ex, np.random.default_rng(0), after, counters)
        assert seq["tokens"].tolist() == [BOS_ID, BOI_ID, 0, 0, 0, 0, EOI_ID] + [14] * 5
        np.testing.assert_array_equal(seq["patches"][2:6], 2.0)
    assert (counters.overlong, counters.truncated, counters.lost) == (3, 3, 0)
    # An image that cannot fit at all is lost under every policy, and counted as such.
    assert sequence.to_sequence(ex, np.random.default_rng(0), SequenceSpec(6, 2, 2), counters) == []
    assert (counters.unfittable, counters.lost) == (1, 1)


def test_survey_counts_what_the_pipeline_does():
    spec = SequenceSpec(12, 2, 2)
    records = [
        enc({"kind": "text", "text": " ".join(f"w{i}" for i in range(30))}, numbered),
        enc({"kind": "caption", "text": "a b c d e f g h", "latents": np.stack([lat(1.0)])}),
        enc({"kind": "caption", "text": "short", "latents": np.stack([lat(1.0)])}),
        enc(
            {
                "kind": "interleaved",
                "text": "first one <image> then two <image> end",
                "latents": np.stack([lat(1.0), lat(2.0)]),
            }
        ),
    ]
    surveyed, sequenced = sequence.Counters(), sequence.Counters()
    first = dataclasses.replace(spec, caption_first_prob=1.0)
    for record in records:
        sequence.survey(record, spec, surveyed)
        sequenced.examples += 1
        sequence.to_sequence(record, np.random.default_rng(0), first, sequenced)
    assert surveyed == sequenced
    assert (surveyed.examples, surveyed.overlong, surveyed.split, surveyed.truncated) == (
        4,
        3,
        1,
        2,
    )


def test_packed_rows_keep_every_token_of_a_long_document():
    src = [
        enc({"kind": "text", "text": " ".join(f"w{i}" for i in range(50))}, numbered),
        enc({"kind": "text", "text": "w60 w61"}, numbered),
    ]
    counters = sequence.Counters()
    ds = pipeline.packed_dataset(
        src, SPEC, batch_size=1, num_epochs=1, shuffle=False, counters=counters
    )
    tokens = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in ds])
    text = tokens[tokens >= 100]
    assert sorted(text.tolist()) == [*range(100, 150), 160, 161]
    assert (tokens == BOS_ID).sum() == 2 and (tokens == EOS_ID).sum() == 2
    assert (counters.examples, counters.overlong, counters.split, counters.lost) == (2, 1, 1, 0)


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
        out.append(enc({"kind": kind, "text": text, "latents": lats}))
    return out


def batches(n, **kw):
    args = dict(batch_size=4, seed=3, num_packing_bins=8) | kw
    it = iter(pipeline.packed_dataset(make_source(), SPEC, **args))
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


def test_processes_take_disjoint_rows_of_the_same_global_batches():
    # Every process plans the same global batches and keeps its own rows: the two halves
    # together are exactly the one-process batches, whatever the process count.
    args = dict(batch_size=4, seed=3, num_packing_bins=8)
    one = iter(pipeline.packed_dataset(make_source(), SPEC, **args))
    two = [
        iter(pipeline.packed_dataset(make_source(), SPEC, process_index=p, process_count=2, **args))
        for p in range(2)
    ]
    for _ in range(5):
        whole, halves = next(one), [next(it) for it in two]
        for k in whole:
            np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]))


def consumed(batch) -> list[int]:
    """Record ids in a batch of `id_source`, one per sequence (each record is one sequence)."""
    first = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
    return sorted(int(t) - 100 for t in batch["tokens"][np.roll(first, 1, axis=-1)])


def id_source(n=60):
    ids = lambda text: [100 + int(text[2:])]
    return [enc({"kind": "text", "text": f"id{i}"}, ids) for i in range(n)]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_position_resumes_on_another_process_count(before, after):
    """A checkpoint made by N processes resumes on M: across the restart, the multiset of
    examples consumed equals an uninterrupted run's (none skipped, none repeated)."""
    args = dict(batch_size=4, seed=7, num_packing_bins=4)

    def make(p, n):
        return iter(
            pipeline.packed_dataset(id_source(), SPEC, process_index=p, process_count=n, **args)
        )

    def step(its):  # one global step: every process's rows
        return sorted(r for it in its for r in consumed(next(it)))

    its = [make(0, 1)]
    reference = [step(its) for _ in range(12)]
    its = [make(p, before) for p in range(before)]
    seen = [step(its) for _ in range(5)]
    states = [it.get_state() for it in its]
    assert len({str(s) for s in states}) == 1  # the position is the same in every process
    resumed = [make(p, after) for p in range(after)]
    for it in resumed:
        it.set_state(states[0])
    seen += [step(resumed) for _ in range(7)]
    assert sorted(sum(seen, [])) == sorted(sum(reference, []))
    assert seen == reference  # in fact the same global batches, in order


def test_resume_sees_the_same_batches():
    it, _ = batches(3)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = iter(
        pipeline.packed_dataset(make_source(), SPEC, batch_size=4, seed=3, num_packing_bins=8)
    )
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


class Flaky:
    """A source whose record 4 cannot be read (a corrupt file, say)."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        if i == 4:
            raise OSError("corrupt block")
        return self.records[i]


def test_unreadable_records_are_skipped_or_raise():
    src = Flaky(make_source(30))
    counters = sequence.Counters()
    ds = pipeline.packed_dataset(
        src, SPEC, batch_size=1, num_epochs=1, shuffle=False, counters=counters
    )
    list(ds)
    assert counters.decode_errors == 1
    strict = sequence.SequenceSpec(24, 2, 2, on_error="raise")
    with pytest.raises(ValueError, match="record 4 .* cannot be read: corrupt block"):
        list(pipeline.packed_dataset(src, strict, batch_size=1, num_epochs=1, shuffle=False))


def test_record_serialization_round_trip():
    for ex in (
        {"kind": "caption", "text": "a red dot", "latents": np.stack([lat(1.5)])},
        {
            "kind": "interleaved",
            "text": "x <image> yy <image>",
            "latents": np.stack([lat(1), lat(2)]),
        },
        {"kind": "text", "text": "just words here"},
        {"kind": "caption", "text": "", "latents": np.stack([lat(3)])},  # unconditional image
    ):
        rec = enc(ex)
        back = encoded.deserialize(encoded.serialize(rec))
        assert back.kind == rec.kind and len(back.pieces) == len(rec.pieces)
        for a, b in zip(back.pieces, rec.pieces, strict=True):
            assert type(a) is type(b) and np.array_equal(a, b)
        np.testing.assert_array_equal(back.latents, rec.latents)
    assert [type(p) for p in enc(ex).pieces] == [int]  # empty caption: the image alone
    with pytest.raises(ValueError, match="caption example has 1 image positions .* but 2"):
        enc({"kind": "caption", "text": "x", "latents": np.stack([lat(1), lat(2)])})
    with pytest.raises(ValueError, match="bad magic"):
        encoded.deserialize(b"\0" * 64)


class RawSource:
    """Raw examples as `sources.open_split` gives them; example 3 has an undecodable image."""

    def __init__(self, n=7, bad=(3,)):
        self.n, self.bad = n, bad

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise sources.RecordError(f"img_{i}.png: cannot identify image file")
        images = [np.full((8, 8, 3), i * 10, np.uint8)] * (i % 3)
        kind = ["text", "caption", "interleaved"][i % 3]
        text = {"text": "words", "caption": f"a dot {i}", "interleaved": "a <image> b <image>"}
        return {"kind": kind, "text": text[kind], "images": images}


def test_encoded_records_round_trip_and_skip_bad_examples(tmp_path):
    pool = encoded.pool_encoder(factor=2, channels=3)
    path = tmp_path / "e.array_record"
    stats = encoded.write_encoded(
        path, RawSource(), encode, pool, (4, 4, 3), batch_size=2, progress=False
    )
    assert (stats.examples, stats.skipped) == (6, 1)
    assert stats.images == sum(i % 3 for i in range(7) if i != 3)
    src = encoded.EncodedSource(path)
    assert len(src) == 6
    assert src[0].kind == encoded.TEXT and src[0].latents.shape == (0, 4, 4, 3)
    five = src[4]  # example 5 (example 3 was skipped): interleaved, 2 images
    assert five.kind == encoded.INTERLEAVED and five.latents.shape == (2, 4, 4, 3)
    want = pool(np.stack(RawSource()[5]["images"]))[1]
    np.testing.assert_allclose(five.latents[1].astype(np.float32), want, atol=1e-2)
    assert [p if isinstance(p, int) else p.tolist() for p in five.pieces] == [[11], 0, [11], 1]
    # Re-encoding (a retrained VAE) replaces the file atomically.
    other = encoded.pool_encoder(factor=2, channels=3, seed=1)
    encoded.write_encoded(path, RawSource(), encode, other, (4, 4, 3), progress=False)
    again = encoded.EncodedSource(path)[4].latents[1].astype(np.float32)
    np.testing.assert_allclose(again, other(np.stack(RawSource()[5]["images"]))[1], atol=1e-2)
    with pytest.raises(ValueError, match="example 3 .* img_3.png: cannot identify"):
        encoded.write_encoded(
            path, RawSource(), encode, pool, (4, 4, 3), on_error="raise", progress=False
        )
    assert len(encoded.EncodedSource(path)) == 6  # a failed encode leaves the old file whole
    with pytest.raises(FileNotFoundError, match="python -m tfx_jax data encode"):
        encoded.EncodedSource(tmp_path / "missing.array_record")


def test_packed_batch_of_a_hand_made_source_is_exact():
    """Three documents, first-fit into two rows of 24: every id, position and mask entry."""
    src = [
        enc({"kind": "caption", "text": "a red dot", "latents": np.stack([lat(1.0)])}),  # 11
        enc({"kind": "text", "text": "hi there"}),  # 4: fits after the first
        enc({"kind": "text", "text": " ".join(["word"] * 10)}),  # 12: opens row 2
    ]
    spec = sequence.SequenceSpec(24, 2, 2, caption_first_prob=1.0)
    ds = pipeline.packed_dataset(
        src, spec, batch_size=2, num_epochs=1, shuffle=False, num_packing_bins=2
    )
    (b,) = list(ds)
    pad = [0] * 9
    assert b["tokens"][0].tolist() == (
        [BOS_ID, 11, 13, 13, BOI_ID, 0, 0, 0, 0, EOI_ID, EOS_ID] + [BOS_ID, 12, 15, EOS_ID] + pad
    )
    assert b["segment_ids"][0].tolist() == [1] * 11 + [2] * 4 + pad
    assert b["positions"][0].tolist() == list(range(11)) + list(range(4)) + pad
    assert b["image_ids"][0].tolist() == [0] * 5 + [1] * 4 + [0] * 15
    assert b["tokens"][1].tolist() == [BOS_ID] + [14] * 10 + [EOS_ID] + [0] * 12
    assert b["segment_ids"][1].tolist() == [1] * 12 + [0] * 12
    assert b["positions"][1].tolist() == list(range(12)) + [0] * 12
    assert (b["image_ids"][1] == 0).all()
    np.testing.assert_array_equal(b["patches"][0, 5:9], 1.0)
    assert (b["patches"][0, :5] == 0).all() and (b["patches"][0, 9:] == 0).all()
    assert (b["patches"][1] == 0).all()

    mask = np.asarray(
        attention_mask(b["segment_ids"], b["segment_ids"], b["image_ids"], b["image_ids"])
    )[0]
    assert mask[5, 8] and mask[8, 5]  # patches of one image see each other (bidirectional)
    assert mask[8, 0] and not mask[4, 5]  # patches see the caption; BOI does not see patches
    assert mask[10, 9] and not mask[9, 10]  # causal over text
    assert not mask[11, 10] and not mask[12, 3]  # document 2 never sees document 1
    assert mask[14, 11] and mask[14, 14]


def test_worker_processes_are_deterministic_and_resumable():
    def run(state=None, n=3):
        it = iter(pipeline.packed_dataset(make_source(), SPEC, batch_size=4, worker_count=2))
        if state is not None:
            it.set_state(state)
        return it, [next(it)["tokens"] for _ in range(n)]

    it, first = run()
    state = it.get_state()
    after = [next(it)["tokens"] for _ in range(2)]
    _, again = run()
    _, resumed = run(state, n=2)
    for x, y in zip(first + after, again + resumed, strict=True):
        np.testing.assert_array_equal(x, y)


def test_worker_count_is_fixed_for_a_run():
    """Each Grain worker packs its own slice of the examples, so another worker count gives other
    batches: resuming with one is refused by name (the read-ahead threads may change)."""
    import json

    from tfx_jax import checkpoint, config

    cfg = config.Config()
    saved = json.loads(json.dumps(cfg.to_dict()))  # as the checkpoint's meta holds it
    more_workers = config.replace_path(cfg, "data.worker_count", 4)
    assert checkpoint.config_differences(saved, more_workers) == ["data.worker_count: 0 -> 4"]
    more_threads = config.replace_path(cfg, "data.read_threads", 8)
    assert checkpoint.config_differences(saved, more_threads) == []
