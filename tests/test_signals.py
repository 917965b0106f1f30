"""Signals at any moment and a full disk end in a committed checkpoint or none, an exit code that
says which, and one line, never a traceback (issue: "Nothing silent, nothing hung").

Each case runs `python -m tfx_jax train` in a subprocess through `cli.main`, with the fault
injected by a small wrapper (a signal sent from inside compile, a step hook, or a save).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, run_subprocess

from tfx_jax.checkpoint import Checkpointer

TINY = str(REPO / "experiments/tiny.py")
SETS = ["train.log_every=1", "checkpoint.every_steps=2", "checkpoint.async_save=true"]

# The wrapper: FAULT (a Python snippet) patches tfx_jax, then the real CLI runs.
WRAPPER = """
import functools, os, signal, sys, time
from tfx_jax import checkpoint, cli
from tfx_jax.train import loop

FAULT
cli.main(sys.argv[1:])
"""


def run(workdir, fault: str, steps: int = 6, timeout: int = 300):
    argv = ["train", "--config", TINY, "--workdir", str(workdir)]
    for s in [*SETS, f"train.steps={steps}"]:
        argv += ["--set", s]
    # Unoptimized compiles: these tests check what a run says and saves, not its numbers.
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    )
    code = WRAPPER.replace("FAULT", fault)
    return run_subprocess(
        [sys.executable, "-c", code, *argv],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def committed(workdir) -> list[int]:
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False, create=False)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def assert_clean(proc):
    assert "Traceback" not in proc.stderr, proc.stderr


def test_sigterm_during_compile_stops_before_the_first_step(tmp_path):
    fault = """
compile = loop.Trainer.compile
def signalled_compile(self):
    os.kill(os.getpid(), signal.SIGTERM)
    return compile(self)
loop.Trainer.compile = signalled_compile
"""
    proc = run(tmp_path, fault)
    assert proc.returncode == 0, proc.stderr
    assert_clean(proc)
    assert "during compilation: stopped before the first step" in proc.stderr
    assert committed(tmp_path) == []


def test_second_signal_during_the_final_save_still_commits(tmp_path):
    """SIGINT (Ctrl-C) after step 3; the preemption save of step 4 gets a SIGTERM in the middle:
    it is deferred, step 4 is committed, then the 'committed' line, exit 0."""
    fault = """
def hook(step):
    if step == 3:
        os.kill(os.getpid(), signal.SIGINT)
loop.train = functools.partial(loop.train, after_step=hook)
save = checkpoint.Checkpointer.save
def save_with_signal(self, step, *args):
    save(self, step, *args)
    if step == 4:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 4 is being written
        time.sleep(0.2)
checkpoint.Checkpointer.save = save_with_signal
"""
    proc = run(tmp_path, fault)
    assert proc.returncode == 0, proc.stderr
    assert_clean(proc)
    assert "SIGTERM again" in proc.stderr and "is being written" in proc.stderr
    assert "SIGINT: checkpoint for step 4 committed" in proc.stderr
    assert committed(tmp_path)[-1] == 4


def test_second_signal_outside_a_save_stops_at_once(tmp_path):
    fault = """
def hook(step):
    if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
loop.train = functools.partial(loop.train, after_step=hook)
"""
    proc = run(tmp_path, fault)
    assert proc.returncode == 128 + 15, proc.stderr
    assert_clean(proc)
    assert "SIGTERM again: stopped at once without saving" in proc.stderr
    assert committed(tmp_path) == [2]  # the periodic save before the signals is committed


def test_second_signal_after_the_commit_says_the_step_is_saved(tmp_path):
    """SIGTERM after step 3; a second one right after "checkpoint for step 4 committed" (sent
    from that log record, outside any save): the process stops at once, says step 4 is
    committed (not "without saving"), exit 143, and no traceback of any kind."""
    fault = """
import logging
def hook(step):
    if step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
loop.train = functools.partial(loop.train, after_step=hook)
class Again(logging.Handler):
    def emit(self, record):
        if "committed; exiting" in record.getMessage():
            os.kill(os.getpid(), signal.SIGTERM)
logging.getLogger("tfx_jax").addHandler(Again())
"""
    proc = run(tmp_path, fault)
    assert proc.returncode == 128 + 15, proc.stderr
    assert_clean(proc)
    assert "Exception ignored" not in proc.stderr and "Logging error" not in proc.stderr
    assert "again: stopped at once without saving" not in proc.stderr, proc.stderr
    last = [x for x in proc.stderr.splitlines() if x.strip()][-1]  # after the progress bar
    assert last.endswith(
        "SIGTERM again: stopped at once; the checkpoint for step 4 is committed (resume with "
        "the same command)."
    ), proc.stderr
    assert committed(tmp_path)[-1] == 4


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    return ok.returncode == 0


def test_full_disk_stops_with_one_line_and_resumes(tmp_path):
    """A disk that fills up after checkpoint 2: the run stops at once with exit 1 and one line
    naming the path and the OS error; checkpoint 2 stays intact and resumes once there is room.
    (A 64 MiB tmpfs where the machine allows mounting; else an injected ENOSPC.)"""
    disk = tmp_path / "disk"
    real = _mount_tmpfs(disk, "64m")
    workdir = disk / "run"
    fill = f"""
def hook(step):
    if step == 3:
        while 2 not in checkpoint.Checkpointer(r"{workdir}/checkpoints", async_save=False,
                                               create=False).all_steps():
            time.sleep(0.05)
        if {real}:  # fill the disk
            with open(r"{disk}/balloon", "wb") as f:
                try:
                    while True:
                        f.write(b"x" * (1 << 20))
                        f.flush()
                except OSError:
                    pass
        else:  # no tmpfs here: the metrics file's next write fails as on a full disk
            import errno
            def full(self, *a, **k):
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
            loop.metric_writers.JsonlWriter.write_scalars = full
loop.train = functools.partial(loop.train, after_step=hook)
"""
    try:
        proc = run(workdir, fill)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert_clean(proc)
        last = [x for x in proc.stderr.splitlines() if x.strip()][-1]
        assert "No space left on device" in last and str(workdir) in last, proc.stderr
        assert committed(workdir) == [2]
        if real:
            os.remove(disk / "balloon")
        proc = run(workdir, "")
        assert proc.returncode == 0, proc.stderr
        assert committed(workdir)[-1] == 6
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(x)["step"] for x in lines]
        assert steps[-1] == 6
    finally:
        if real:
            subprocess.run(["umount", str(disk)])
        shutil.rmtree(disk, ignore_errors=True)


# A full disk under an async save (step 12 of every_steps=2): some arrays' writes of that step
# fail with ENOSPC while the other arrays' TensorStore writes are still in flight; the failure
# surfaces at step 13's check or step 14's save.
FULL_DISK_AT_12 = """
import asyncio, errno
from orbax.checkpoint._src.serialization import serialization
write = serialization.async_serialize_from_host
calls = []
async def full_disk(rslices, spec, **kwargs):
    if "/12.orbax-checkpoint-tmp" in str(spec):
        calls.append(spec)
        if len(calls) >= 3 and len(calls) % 2:  # the others are being written meanwhile
            await asyncio.sleep(0.01)
            raise OSError(errno.ENOSPC, "No space left on device", "12.orbax-checkpoint-tmp")
    return await write(rslices, spec, **kwargs)
serialization.async_serialize_from_host = full_disk
"""


def test_failed_async_save_is_one_line_naming_its_step(tmp_path):
    """The error names the step whose save failed (12), not the step that noticed it; nothing
    follows it (no TensorStore 'Event loop is closed' tracebacks, no unretrieved asyncio task
    errors) and the failed step is not listed as committed."""
    proc = run(tmp_path, FULL_DISK_AT_12, steps=16)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert_clean(proc)
    for noise in ("Event loop is closed", "never retrieved", "never awaited", "destroyed"):
        assert noise not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("checkpoint error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr
    assert "writing step 12 to" in errors[0] and "No space left on device" in errors[0]
    assert "Committed checkpoints ([6, 8, 10]) are intact" in errors[0], errors[0]
    assert [x for x in lines if "step 12" in x] == errors, proc.stderr
    assert committed(tmp_path) == [6, 8, 10]


@pytest.mark.parametrize("signum_name", ["SIGTERM", "SIGINT"])
def test_signal_in_the_loop_saves_and_exits_zero(tmp_path, signum_name):
    fault = f"""
def hook(step):
    if step == 3:
        os.kill(os.getpid(), signal.{signum_name})
loop.train = functools.partial(loop.train, after_step=hook)
"""
    proc = run(tmp_path, fault)
    assert proc.returncode == 0, proc.stderr
    assert_clean(proc)
    assert f"{signum_name}: checkpoint for step 4 committed" in proc.stderr
    assert committed(tmp_path)[-1] == 4
