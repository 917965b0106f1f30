"""`data encode` on every process: 2 processes (4 CPU devices each) write the same shards,
byte for byte, as one 8-device process; a shard whose completion marker is missing is encoded
again and nothing else is; a second run with the same inputs does nothing and says so."""

from __future__ import annotations

import itertools
import json
import pathlib
import shutil

import flax
import jax
import numpy as np
import pytest
from array_record.python.array_record_data_source import ArrayRecordDataSource
from conftest import REPO
from test_multihost import run_processes

from tfx_jax import artifacts, stages
from tfx_jax.config import load_config
from tfx_jax.data import encoded

# The tiny shapes set (512 / 64 / 64 examples): 4 train shards of 128, one each for the others.
OVERRIDES = [
    "data.source=shapes",
    "data.tfds_config=tiny",
    "data.encode_shard_size=128",
    "vae.channels=8,16",
]


def _untrained_vae(cfg) -> None:
    """A VAE with its initial weights where `python -m tfx_jax vae` puts a trained one: what
    is tested is where latents go, not how good they are, and training one costs ~20 s."""
    model = artifacts.vae_model(cfg)
    x = np.zeros((1, cfg.data.image_size, cfg.data.image_size, 3), np.float32)
    shapes = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    rng = np.random.default_rng(0)  # random weights (an eager init would take ~30 s on CPU)
    params = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(s.dtype), shapes)
    out = artifacts.vae_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.msgpack").write_bytes(flax.serialization.to_bytes(params))
    summary = {**artifacts.vae_settings(cfg), "scale_factor": 0.7, "heldout_psnr_db": 0.0}
    (out / "vae.json").write_text(json.dumps(summary))


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _records(shard) -> list[bytes]:
    source = ArrayRecordDataSource([str(shard)])
    return list(source.__getitems__(range(len(source))))


@pytest.mark.slow
def test_two_processes_encode_the_same_shards_resume_and_stop(tmp_path, capsys):
    data_dir = tmp_path / "data"
    overrides = [f"data.data_dir={data_dir}", *OVERRIDES]
    cfg = load_config(REPO / "experiments/tiny.py", overrides)
    stages.build_dataset(cfg)
    stages.build_tokenizer(cfg)
    _untrained_vae(cfg)
    out = pathlib.Path(artifacts.made_by_path(cfg).parent)

    # One process, 8 devices: the reference.
    stages.encode(cfg)
    assert "0 of 6 shards are done already; 6 to encode on 1 process(es)" in capsys.readouterr().out
    reference = _files(out)
    shards = sorted(n for n in reference if n.endswith(".array_record"))
    assert [f"train-{k:05d}-of-00004.array_record" for k in range(4)] == shards[1:5]
    assert len(shards) == 6 and all(n + ".done" in reference for n in shards)
    assert all(n + ".index.npz" in reference for n in shards)
    assert artifacts.encoded_is_current(cfg)
    source = encoded.EncodedSource(artifacts.encoded_path(cfg, "train"))
    assert len(source) == 512 and source[300].latents.shape[1:] == (8, 8, 4)
    # The concatenated indexes describe the records they are read with.
    for i in (0, 127, 128, 511):
        want, got = source[i], source.read_shells([i])[0]
        assert got.kind == want.kind
        assert [p if isinstance(p, int) else len(p) for p in got.pieces] == [
            p if isinstance(p, int) else len(p) for p in want.pieces
        ]

    # Two processes, 4 devices each, into a fresh directory: the same files, byte for byte
    # (the completion markers and made_by.json hold the same counts; the records the same
    # bytes in the same order, so training reads the same data).
    one = tmp_path / "one"
    shutil.move(out, one)
    sets = [x for o in overrides for x in ("--set", o)]
    outs = run_processes(
        ["data", "encode", "--config", str(REPO / "experiments/tiny.py"), *sets], 2
    )
    assert "6 to encode on 2 process(es)" in outs[0]
    assert "encoded/train: 512 examples" in outs[0] and "encoded/train" not in outs[1]
    two = _files(out)
    assert sorted(two) == sorted(reference)
    for name in shards:
        assert _records(out / name) == _records(one / name), name
        assert two[name] == reference[name], name
        assert two[name + ".index.npz"] == reference[name + ".index.npz"], name
        assert json.loads(two[name + ".done"]) == json.loads(reference[name + ".done"]), name
    assert json.loads(two["made_by.json"]) == json.loads(reference["made_by.json"])

    # A killed encode: train shard 2 lost its marker (killed before the marker was written) and
    # left a partial temporary file. Only that shard is encoded again.
    (out / "train-00002-of-00004.array_record.done").unlink()
    (out / "train-00002-of-00004.array_record.tmp").write_bytes(b"partial")
    assert not artifacts.encoded_is_current(cfg)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    stages.encode(cfg)
    printed = capsys.readouterr().out
    assert "5 of 6 shards are done already; 1 to encode on 1 process(es)" in printed
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    redone = {n for n in after if after[n] != before.get(n)}
    assert redone == {
        "train-00002-of-00004.array_record",
        "train-00002-of-00004.array_record.index.npz",
        "train-00002-of-00004.array_record.done",
        "made_by.json",
    }
    assert _files(out) == reference

    # The same inputs again: nothing is written, and it says so.
    stages.encode(cfg)
    assert "are current (made_by.json): nothing to encode" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == after


@pytest.mark.parametrize("n", [0, 5, 130])
def test_length_indexes_concatenate_in_file_order(n):
    lat = (2, 2, 1)
    rng = np.random.default_rng(n)

    def record(i):
        pieces = [np.zeros(int(rng.integers(1, 9)), np.int32)] + ([0] if i % 2 else [])
        return encoded.Record(i % 3, pieces, np.zeros((i % 2, *lat), np.float16))

    records = [record(i) for i in range(n)]
    cuts = [0, n // 3, n // 3, n]  # an empty part in the middle
    parts = [encoded.LengthIndex.of(records[a:b], lat) for a, b in itertools.pairwise(cuts)]
    whole, joined = encoded.LengthIndex.of(records, lat), encoded.LengthIndex.concat(parts)
    for key in ("kinds", "offsets", "lengths"):
        np.testing.assert_array_equal(getattr(joined, key), getattr(whole, key), err_msg=key)
