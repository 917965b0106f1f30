"""A run never loses work: exact resume after SIGKILL, SIGTERM saves, resharding, bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, run_subprocess

from tfx_jax import sharding
from tfx_jax.checkpoint import Checkpointer
from tfx_jax.config import ConfigError
from tfx_jax.train.loop import NonFiniteLossError, Trainer, train

STEPS = 8
FLAGS = [
    "--set",
    f"train.steps={STEPS}",
    "--set",
    "checkpoint.every_steps=3",
    "--set",
    "train.log_every=1",
    "--set",
    "checkpoint.async_save=true",
]


def run_cli(workdir, *extra, env_extra=None, wait=True):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", **(env_extra or {})
    )
    cmd = [
        sys.executable,
        "-m",
        "tfx_jax",
        "train",
        "--config",
        str(REPO / "experiments/tiny.py"),
        "--workdir",
        str(workdir),
        *FLAGS,
        *extra,
    ]
    if not wait:
        return subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return run_subprocess(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


# The crash: `train` with an `after_step` hook that SIGKILLs the process right after a step
# (its checkpoint logic done), in a subprocess configured exactly like `run_cli`'s.
KILL_SNIPPET = """
import os, signal, sys
from tfx_jax.config import load_config
from tfx_jax.train import loop

kill_at, workdir, config, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]

def after_step(step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

loop.train(load_config(config, overrides), workdir, after_step=after_step)
"""


def run_killed(workdir, kill_at, *extra):
    """Like `run_cli(workdir, *extra)` (only `--set` flags), SIGKILLed after step `kill_at`."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    flags = [*FLAGS, *extra]
    assert flags[::2] == ["--set"] * (len(flags) // 2), flags
    cmd = [
        sys.executable,
        "-c",
        KILL_SNIPPET,
        str(kill_at),
        str(workdir),
        str(REPO / "experiments/tiny.py"),
        *flags[1::2],
    ]
    return run_subprocess(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def final_params(tiny_config, workdir, overrides=()):
    cfg = tiny_config(overrides=[f"train.steps={STEPS}", *overrides])
    trainer = Trainer(cfg)
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False, create=False)
    step = ckpt.latest_step()
    state, _ = ckpt.restore(step, trainer.abstract_state())
    ckpt.close()
    return step, jax.device_get(state.params)


def assert_bitwise_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), "parameters differ"


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tiny_config, tmp_path, compile_cache):
    # Five processes train the same model: the compilation cache compiles it once.
    ref = run_cli(tmp_path / "ref")
    assert ref.returncode == 0, ref.stdout + ref.stderr
    _, want = final_params(tiny_config, tmp_path / "ref")
    # Killed one step after a synchronous save (step 3), and mid-interval with async saves
    # (Orbax finishes save 3 before starting save 6, so at step 7 at least step 3 is complete).
    for kill_at, async_save in ((4, "false"), (7, "true")):
        wd = tmp_path / f"killed_at_{kill_at}"
        dead = run_killed(wd, kill_at, "--set", f"checkpoint.async_save={async_save}")
        assert dead.returncode == -signal.SIGKILL, dead.stdout + dead.stderr
        resumed = run_cli(wd)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "resumed from" in resumed.stderr
        step, got = final_params(tiny_config, wd)
        assert step == STEPS
        assert_bitwise_equal(got, want)


def test_restore_onto_other_meshes_and_continue(tiny_config, tmp_path, compile_cache, fast_compile):
    # fast_compile: what is compared is restored bytes, not computed values (bitwise below).
    cfg = tiny_config(overrides=["mesh.data=2", "mesh.fsdp=4", "train.steps=4"])
    history = train(cfg, tmp_path)
    assert history[-1]["step"] == 4
    _, saved = final_params(tiny_config, tmp_path, ["mesh.data=2", "mesh.fsdp=4"])
    for overrides, n_devices in ((["mesh.data=1", "mesh.fsdp=-1"], 8), (["mesh.data=-1"], 4)):
        cfg2 = tiny_config(overrides=[*overrides, "train.steps=4"])
        trainer = Trainer(cfg2, mesh=sharding.make_mesh(cfg2.mesh, jax.devices()[:n_devices]))
        ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False, create=False)
        state, meta = ckpt.restore(4, trainer.abstract_state())
        ckpt.close()
        assert meta["step"] == 4 and int(state.step) == 4
        assert_bitwise_equal(jax.device_get(state.params), saved)
        emb = state.params["embed"]["embedding"]
        assert len(emb.sharding.device_set) == n_devices
        trainer.state = state
        from tfx_jax.train.loop import make_batches

        m = trainer.train_step(next(make_batches(cfg2)))
        assert np.isfinite(float(m["loss"])) and int(trainer.state.step) == 5


def test_half_written_step_is_ignored(tiny_config, tmp_path, compile_cache):
    cfg = tiny_config(overrides=["train.steps=2", "checkpoint.every_steps=1"])
    train(cfg, tmp_path)
    ckpts = tmp_path / "checkpoints"
    # A save killed mid-write leaves an unfinalised temporary directory behind.
    (ckpts / "3.orbax-checkpoint-tmp-12345").mkdir()
    (ckpts / "3.orbax-checkpoint-tmp-12345" / "state").mkdir()
    ckpt = Checkpointer(ckpts, async_save=False, create=False)
    assert ckpt.latest_step() == 2
    ckpt.close()
    history = train(tiny_config(overrides=["train.steps=3", "checkpoint.every_steps=1"]), tmp_path)
    assert [h["step"] for h in history] == [3]


def test_incompatible_config_names_the_keys(tiny_config, tmp_path):
    train(tiny_config(overrides=["train.steps=1"]), tmp_path)
    with pytest.raises(ConfigError, match=r"model.d_model: 64 -> 96"):
        train(tiny_config(overrides=["train.steps=2", "model.d_model=96"]), tmp_path)


def test_a_key_added_since_the_checkpoint_reads_as_that_runs_value(tiny_config):
    """A checkpoint written before a setting existed resumes under the same settings: the key
    it lacks reads as today's default (a new setting defaults to the old behaviour), or as
    the old default where that changed since (`_OLD_DEFAULTS`)."""
    from tfx_jax.checkpoint import config_differences

    cfg = tiny_config()
    old = json.loads(cfg.to_json())
    del old["model"]["image_attention"]  # a newer setting; its default is the old behaviour
    assert config_differences(old, cfg) == []
    causal = tiny_config(overrides=["model.image_attention=causal"])
    assert config_differences(old, causal) == ["model.image_attention: 'bidirectional' -> 'causal'"]
    rolling = tiny_config(overrides=["diffusion.mode=rolling"])
    old = json.loads(rolling.to_json())
    del old["diffusion"]["rolling_context_noise"]  # written when it was 0.0 (now 0.1)
    assert config_differences(old, rolling) == ["diffusion.rolling_context_noise: 0.0 -> 0.1"]


def test_unwritable_workdir_fails_before_training(tiny_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="is not writable"):
        train(tiny_config(), blocker / "run")


def _nan_batches(cfg):
    from tfx_jax.train.loop import make_batches

    it = make_batches(cfg)
    for i, b in enumerate(it):
        if i == 1:
            b = dict(b, patches=np.full_like(b["patches"], np.nan))
        yield b


def test_nan_loss_is_skipped_or_stops(tiny_config, tmp_path, compile_cache):
    cfg = tiny_config(overrides=["train.steps=3", "train.log_every=1", "checkpoint.every_steps=1"])
    history = train(cfg, tmp_path / "skip", batches=_nan_batches(cfg))
    assert [h["finite"] for h in history] == [1.0, 0.0, 1.0]
    assert history[-1]["skipped"] == 1.0 and np.isfinite(history[-1]["loss"])
    stop = tiny_config(
        overrides=[
            "train.steps=3",
            "train.log_every=1",
            "checkpoint.every_steps=1",
            "train.nan_policy=stop",
        ]
    )
    with pytest.raises(NonFiniteLossError, match="last good checkpoint \\(1\\)"):
        train(stop, tmp_path / "stop", batches=_nan_batches(stop))
    time.sleep(0.1)
    ckpt = Checkpointer(tmp_path / "stop" / "checkpoints", async_save=False, create=False)
    assert ckpt.latest_step() == 1
    ckpt.close()


def _dying_batches(cfg, after: int):
    """`after` batches, then what Grain raises when a worker process is killed."""
    from tfx_jax.train.loop import make_batches

    for i, b in enumerate(make_batches(cfg)):
        if i == after:
            raise RuntimeError("Worker process was terminated unexpectedly with exit code -9.")
        yield b


def test_input_pipeline_failure_saves_the_steps_done(tiny_config, tmp_path, compile_cache):
    """A data worker killed mid-run (e.g. for memory) stops the run with one clear error, after
    the steps already trained are committed — no checkpoint was due before the failure."""
    from tfx_jax.train.loop import InputPipelineError

    cfg = tiny_config(overrides=["train.steps=5", "checkpoint.every_steps=100"])
    with pytest.raises(InputPipelineError, match="before step 3: Worker process.*step 2 is saved"):
        train(cfg, tmp_path / "run", batches=_dying_batches(cfg, after=2))
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False, create=False)
    assert ckpt.latest_step() == 2
    ckpt.close()


def test_relative_workdir(tiny_config, tmp_path, monkeypatch):
    """`make demo` passes a relative --workdir; Orbax needs absolute paths internally."""
    monkeypatch.chdir(tmp_path)
    train(tiny_config(overrides=["train.steps=1"]), "runs/rel")
    ckpt = Checkpointer("runs/rel/checkpoints", async_save=False, create=False)
    assert ckpt.latest_step() == 1
    ckpt.close()


# In a fresh process (pytest swaps `sys.unraisablehook` per test): TensorStore writes whose
# event loop was closed under them (a failed save's abandoned writes), one unrelated
# unraisable exception and two asyncio errors, after a Checkpointer installed its filters.
ABANDONED_WRITES = """
import asyncio, gc, logging, sys, time
import numpy as np, tensorstore as ts
from tfx_jax.checkpoint import Checkpointer
logging.basicConfig()
Checkpointer(sys.argv[1], async_save=False).close()

async def failed_save():
    spec = {"driver": "zarr", "kvstore": f"file://{sys.argv[1]}/ts/"}
    t = await ts.open(spec, create=True, dtype=ts.float32, shape=[4000, 4000])
    writes = [t[i * 100 : (i + 1) * 100].write(np.ones((100, 4000), np.float32)) for i in range(40)]
    asyncio.ensure_future(asyncio.gather(*writes[1:]))
    await asyncio.sleep(0)
    raise OSError(28, "No space left on device")

loop = asyncio.new_event_loop()
try:
    loop.run_until_complete(failed_save())
except OSError:
    pass
loop.close()  # the other writes are still in flight, as when Orbax's run_sync returns
time.sleep(2)

class Unrelated:
    def __del__(self):
        raise ValueError("an unrelated unraisable error")
Unrelated()
gc.collect()
asyncio_log = logging.getLogger("asyncio")
asyncio_log.error("Task exception was never retrieved\\nfuture: <Task coro=<x() defined at "
                  "/site-packages/orbax/checkpoint/_src/serialization/serialization.py:126>>")
asyncio_log.error("Task was destroyed but it is pending!\\ntask: <Task coro=<x() defined at "
                  "/site-packages/orbax/checkpoint/_src/serialization/serialization.py:126>>")
asyncio_log.error("Task exception was never retrieved\\nfuture: <Task coro=<w() defined at "
                  "<string>:2> exception=OSError(28, 'No space left on device: "
                  "/ckpt/12.orbax-checkpoint-tmp/state')>")
full = OSError(28, "No space left on device", "12.orbax-checkpoint-tmp")  # repr drops the file
asyncio_log.error("Task exception was never retrieved\\nfuture: <Task finished coro=<full_disk() "
                  "done, defined at <string>:11> exception=%r>", full, exc_info=full)
asyncio_log.error("Task exception was never retrieved\\nfuture: <Task coro=<mine() defined at "
                  "/work/app.py:3>>")

async def async_serialize_from_host():
    async def write_fragment():
        pass
    return write_fragment
write_fragment = asyncio.run(async_serialize_from_host())
write_fragment()  # Orbax's, never started: no warning

async def my_coroutine():
    pass
my_coroutine()  # anyone else's: warned as usual
gc.collect()
print("done", flush=True)
"""


def test_only_a_failed_saves_abandoned_writes_are_silenced(tmp_path):
    proc = run_subprocess(
        [sys.executable, "-c", ABANDONED_WRITES, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr
    assert "Event loop is closed" not in proc.stderr, proc.stderr
    assert "orbax/checkpoint" not in proc.stderr and "orbax-checkpoint-tmp" not in proc.stderr
    assert "ValueError: an unrelated unraisable error" in proc.stderr, proc.stderr
    assert "mine() defined at /work/app.py" in proc.stderr, proc.stderr
    assert "write_fragment" not in proc.stderr and "full_disk" not in proc.stderr, proc.stderr
    assert "coroutine 'my_coroutine' was never awaited" in proc.stderr, proc.stderr
