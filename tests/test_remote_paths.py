"""Every path given as a `gs://` URL: data stages, training, checkpoint, resume, export and
sample documents run on a stand-in bucket, and nothing touches the local disk by the URL's name.

There is no network here, so the bucket is a temporary directory reached only through the
three doors a real `gs://` path goes through:
  * `etils.epath` (our code, TFDS, Grain's iterator state, Orbax's metadata): its fsspec backend
    gets a filesystem that behaves like gcsfs (keys "bucket/path", no appending);
  * TensorStore (Orbax's array data): the kvstore spec Orbax builds for a `gs://` path is
    pointed at the directory instead of GCS, and Orbax's bucket lookup returns a plain bucket;
  * ArrayRecord's C++ reader (it reads `gs://` itself; its writer does not, so the encode
    stage writes locally and copies up): its path is translated.
Any other access by the URL string — a bare `open`, `os.makedirs`, `pathlib` — fails, or
creates a `gs:` folder in the working directory, which the test checks stays empty. Leaked
requests to real GCS fail fast: the client libraries are pointed at a closed local port.
"""

import json
import os
import types

import jax
import numpy as np
import pytest
from array_record.python import array_record_module
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

from tfx_jax import cli, export, stages
from tfx_jax import params as params_lib
from tfx_jax.generate.documents import write_documents
from tfx_jax.train.loop import train

BUCKET = "gs://tfx-test"
CLOSED_PORT = "http://127.0.0.1:9"  # discard: connections are refused at once


class FakeGCS(DirFileSystem):
    """gcsfs as epath sees it, over a local directory: paths are "bucket/key" (the protocol
    stripped), and objects cannot be appended to or opened read-write."""

    protocol = ("gs", "gcs")

    def open(self, path, mode="rb", *args, **kwargs):
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"gs://{path}: GCS objects cannot be opened in mode {mode!r}")
        return super().open(path, mode, *args, **kwargs)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """Redirects gs://BUCKET/... to tmp_path/objects/BUCKET/...; yields the local root."""
    root = tmp_path / "objects"
    root.mkdir()
    fake = FakeGCS(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

    def local(url: str) -> str:
        assert url.startswith("gs://"), url
        return str(root / url.removeprefix("gs://"))

    real_fs = epath_backend.fsspec_backend.fs
    monkeypatch.setenv("EPATH_USE_TF", "false")  # epath's fsspec backend even if TF is installed
    monkeypatch.setattr(
        epath_backend.fsspec_backend,
        "fs",
        lambda p: fake if os.fspath(p).startswith("gs://") else real_fs(p),
    )

    def kvstore_for_gcs(path: str) -> dict:
        return {"driver": "file", "path": local(str(path))}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore_for_gcs)
    monkeypatch.setattr(
        gcs_utils, "get_bucket", lambda name: types.SimpleNamespace(name=name)
    )  # Orbax asks whether the bucket has a hierarchical namespace: no
    real_reader = array_record_module.ArrayRecordReader

    def reader(path, *args, **kwargs):
        path = os.fspath(path)
        return real_reader(local(path) if path.startswith("gs://") else path, *args, **kwargs)

    monkeypatch.setattr(array_record_module, "ArrayRecordReader", reader)
    for var in ("TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        monkeypatch.setenv(var, CLOSED_PORT)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root / BUCKET.removeprefix("gs://")
    assert sorted(os.listdir(cwd)) == [], "something wrote a gs:// path as a local path"


@pytest.fixture
def compile_cache(tmp_path):
    """The resumed run compiles the same train step again; a persistent compilation cache, for
    this test only, makes that a cache hit (about half the test's time on 2 busy cores)."""
    from jax._src import compilation_cache

    names = {
        "jax_compilation_cache_dir": str(tmp_path / "compiled"),
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    before = {name: getattr(jax.config, name) for name in names}
    for name, value in names.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # a process that compiled before decided "no cache" then
    yield
    for name, value in before.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def test_data_train_resume_export_on_gs(tiny_config, bucket, compile_cache):
    docs = bucket / "docs"  # the source's text files are in the bucket too
    docs.mkdir(parents=True)
    for i in range(8):
        paras = [f"Paragraph {j} of file {i} says something plain." for j in range(4)]
        (docs / f"f{i}.txt").write_text("\n\n".join(paras))
    run = f"{BUCKET}/run"
    overrides = [
        f"data.data_dir={BUCKET}/data",
        "data.source=text",
        f"data.path={BUCKET}/docs",
        "train.log_every=1",
    ]
    cfg = tiny_config(overrides=[*overrides, "train.steps=1"])

    stages.prepare_all(cfg)  # tokenizer + encoded records, written into the bucket
    assert (bucket / "data" / "tokenizer.model").is_file()
    assert sorted(p.name for p in (bucket / "data" / "encoded").rglob("*.array_record"))

    first = train(cfg, run)
    assert [h["step"] for h in first] == [1]
    steps = [p.name for p in (bucket / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == ["1"], steps

    resumed = train(tiny_config(overrides=[*overrides, "train.steps=2"]), run)
    assert [h["step"] for h in resumed] == [2]  # continued from the checkpoint at step 1
    metrics = (bucket / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]  # appended across runs
    assert len(list((bucket / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 2

    cli.main(["export", "--workdir", run, "--dtype", "float32"])  # default out: under workdir
    out = bucket / "run" / "export" / "step_2"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.model").is_file()
    _, want, _ = params_lib.restore_params(run)
    _, got = export.load_export(f"{run}/export/step_2")
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, want))

    # What `generate` writes (the model's part is covered elsewhere): Markdown, HTML, PNGs.
    piece = types.SimpleNamespace(kind="image", text="", image=np.zeros((4, 4, 3), np.uint8))
    text = types.SimpleNamespace(kind="text", text="a square", image=None)
    result = types.SimpleNamespace(prompt_pieces=[text], pieces=[piece], stop="eos")
    paths = write_documents([result], f"{BUCKET}/samples")
    assert str(paths["html"]) == f"{BUCKET}/samples/samples.html"
    assert "a square" in (bucket / "samples" / "samples.md").read_text()
    assert (bucket / "samples" / "images" / "s000_gen_00.png").is_file()
