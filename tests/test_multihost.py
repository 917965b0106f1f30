"""Two processes on one machine (127.0.0.1, 4 CPU devices each): `run_processes` (shared with
tests/test_shapes_training.py, which trains, evaluates and resumes 2 -> 1 and 1 -> 2 processes
on the real data path) and generation on two processes equal to one."""

import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO, wait_all

from tfx_jax.checkpoint import Checkpointer
from tfx_jax.data.tokenizer import Tokenizer, train_tokenizer
from tfx_jax.train.loop import Trainer


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
