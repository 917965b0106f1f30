"""Two processes on one machine (127.0.0.1, 4 CPU devices each) train and checkpoint; the
checkpoint resumes in one 8-device process and matches a run that was single-process all along."""

import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO

from tfx_jax.checkpoint import Checkpointer
from tfx_jax.train.loop import Trainer, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common(steps):
    return [
        "--set",
        f"train.steps={steps}",
        "--set",
        "checkpoint.every_steps=2",
        "--set",
        "train.log_every=1",
        "--set",
        "mesh.data=-1",
    ]


@pytest.mark.slow
def test_two_processes_train_and_resume_in_one(tiny_config, tmp_path):
    port = free_port()
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tfx_jax",
                "train",
                "--config",
                str(REPO / "experiments/tiny.py"),
                "--workdir",
                str(tmp_path / "two"),
                *common(4),
                "--distributed",
                "explicit",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    assert "(2 processes)" in outs[0]
    data_files = sorted(p.name for p in (tmp_path / "two/checkpoints/4/data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]

    # Continue the 2-process run in this single 8-device process, to step 6 ...
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed_dir)
    cfg6 = tiny_config(overrides=["train.steps=6", "checkpoint.every_steps=2", "train.log_every=1"])
    hist = train(cfg6, resumed_dir)
    assert [h["step"] for h in hist] == [5, 6]
    # ... and compare with a run that was one process from the start.
    ref = train(cfg6, tmp_path / "single")
    np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in ref[-2:]], rtol=1e-5)
    trainer = Trainer(cfg6)
    params = []
    for wd in (resumed_dir, tmp_path / "single"):
        ckpt = Checkpointer(wd / "checkpoints", async_save=False, create=False)
        state, _ = ckpt.restore(6, trainer.abstract_state())
        ckpt.close()
        params.append(jax.device_get(state.params))
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
