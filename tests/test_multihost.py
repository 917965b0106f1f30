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
from conftest import REPO, wait_all

from tfx_jax.checkpoint import Checkpointer
from tfx_jax.data.tokenizer import Tokenizer, train_tokenizer
from tfx_jax.train.loop import Trainer, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(argv: list[str], n: int, timeout: int = 400) -> list[str]:
    """Runs `python -m tfx_jax ARGV` as n processes of one job (8 / n CPU devices each, or one
    8-device process for n = 1); returns their outputs after asserting they all exited 0.

    A job of several processes runs without the persistent compilation cache a test may have
    set (`conftest.compilation_cache`): jax writes entries from process 0 only, so a later job
    finds them on process 0 and compiles afresh on the others, and on CPU that pair of
    executables deadlocks in the step's first cross-process collective (seen with jax 0.12.1:
    both processes wait in the train step forever)."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n}",
        JAX_PLATFORMS="cpu",
        PYTHONFAULTHANDLER="1",  # a hung child prints its stacks on SIGABRT (`wait_all`)
    )
    if n > 1:
        for name in (
            "JAX_COMPILATION_CACHE_DIR",
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
        ):
            env.pop(name, None)
    port = free_port()
    dist = lambda i: (
        ["--distributed", "explicit", "--coordinator", f"127.0.0.1:{port}"]
        + ["--num-processes", str(n), "--process-id", str(i)]
        if n > 1
        else []
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tfx_jax", *argv, *dist(i)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    outs = [out for out, _ in wait_all(procs, timeout)]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    return outs


@pytest.mark.slow
def test_generate_on_two_processes_equals_one(tiny_config, tmp_path):
    """`generate --distributed` with 2 processes: params restored sharded over the global mesh,
    prompts over the batch axes, results gathered; the documents (text and images) are
    byte-identical to a 1-process run, and only process 0 writes them."""
    data_dir = tmp_path / "data"
    cfg = tiny_config(overrides=[f"data.data_dir={data_dir}"])
    trainer = Trainer(cfg)
    ckpt = Checkpointer(tmp_path / "run/checkpoints", async_save=False)
    ckpt.save(1, trainer.state, None, {"config": cfg.to_dict(), "step": 1})
    ckpt.close()
    words = ["red", "blue", "green", "circle", "square", "top", "left", "a", "small", "big"]
    texts = [" ".join(words[(i * k) % 10] for k in range(1, 6)) for i in range(60)]
    Tokenizer(train_tokenizer(texts, 300)).save(data_dir / "tokenizer.model")

    argv = ["generate", "--workdir", str(tmp_path / "run"), "--force-image"]
    argv += ["--max-new-tokens", "3", "--diffusion-steps", "3", "--temperature", "1", "--seed", "5"]
    for prompt in ("red circle", "a small blue square", "green", "big top left"):
        argv += ["--prompt", prompt]
    run_processes([*argv, "--out", str(tmp_path / "one")], 1)
    outs = run_processes([*argv, "--out", str(tmp_path / "two")], 2)
    assert "wrote" in outs[0] and "wrote" not in outs[1]
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.*"))
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.*"))
    assert one == two and len([p for p in one if p.suffix == ".png"]) == 4
    for rel in one:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel


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
def test_two_processes_train_and_resume_in_one(tiny_config, tmp_path, compile_cache):
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
    outs = [out for out, _ in wait_all(procs, 400)]
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
