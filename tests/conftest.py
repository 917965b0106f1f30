"""Test setup: 8 simulated CPU devices so every sharding path runs for real."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_config():
    from tfx_jax.config import load_config

    def make(arg=None, overrides=()):
        path = REPO / "experiments" / "tiny.py"
        return load_config(f"{path}:{arg}" if arg else path, overrides)

    return make


# Every `train` builds its own Trainer and every `python -m tfx_jax` process starts cold, so a test
# that trains one model several times compiles the same steps several times: on 2 CPU cores that
# is most of a slow test's time. A persistent compilation cache turns the repeats into disk reads;
# what runs is the same executable, so the results (bitwise ones included) do not change.
@contextlib.contextmanager
def compilation_cache(path):
    """Within: compiles in this process, and in the processes it starts with `os.environ`, go
    through a persistent XLA compilation cache in `path` (created if missing); every compile is
    cached, however short. The settings are restored after.

    Give each test its own `path` (or one that a file lock guards, as `shapes_run`'s): the
    processes of one test share it safely (they run one after another, and in a multi-process
    job jax writes from process 0 only), but tests running side by side under xdist would write
    the same entries at once."""
    import jax
    from jax._src import compilation_cache as jax_cache

    settings = {
        "jax_compilation_cache_dir": str(path),
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    before = {name: getattr(jax.config, name) for name in settings}
    env_before = {name.upper(): os.environ.get(name.upper()) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)  # child processes read the flags from there
    jax_cache.reset_cache()  # a process that compiled before decided "no cache" then
    try:
        yield pathlib.Path(path)
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        for name, value in env_before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        jax_cache.reset_cache()


# On CPU most of a compile is XLA's optimizing (the tiny U-Net's train-state init: ~14 s, ~2 s
# without), and most tests run what they compile once or a few times: for them an unoptimized
# executable is far cheaper, and it computes the same functions (it rounds differently in the
# last bits only, which assertions that compare within the test or within a tolerance never see).
@contextlib.contextmanager
def fast_compiles():
    """Within: XLA compiles with most optimizations off (`jax_disable_most_optimizations`). For
    tests whose time is compiling, not running, and whose assertions do not compare bitwise
    against a process compiled otherwise. After it every in-memory executable is dropped
    (`jax.clear_caches`), so that no later test runs one of these less-optimized executables."""
    import jax

    name = "jax_disable_most_optimizations"
    before = jax.config.read(name)
    jax.config.update(name, True)
    try:
        yield
    finally:
        jax.config.update(name, before)
        jax.clear_caches()


@pytest.fixture
def fast_compile():
    """`fast_compiles` around one test (for a module: `pytest.mark.usefixtures`)."""
    with fast_compiles():
        yield


@pytest.fixture
def compile_cache(tmp_path):
    """`compilation_cache` for one test, in its own directory (no other test writes there)."""
    with compilation_cache(tmp_path / "xla_cache") as path:
        yield path


# The tiny shapes pipeline of tests/test_shapes_training.py (data.data_dir is added per session).
SHAPES_OVERRIDES = (
    "data.tfds_config=tiny",
    "data.seq_len=128",
    "data.global_batch_size=8",
    "data.packing_bins=8",
    "model.vocab_size=512",
    "model.d_model=64",
    "model.n_layers=2",
    "vae.steps=3",
    "vae.batch_size=16",
    "vae.channels=16,32",
    "train.steps=4",
    "train.log_every=2",
    "train.eval_every=4",
    "train.eval_batches=1",
    "train.eval_samples=2",
    "checkpoint.every_steps=4",
)


@pytest.fixture(scope="session")
def shapes_run(tmp_path_factory):
    """The tiny shapes data built (TFDS → tokenizer → VAE → encoded records) and one process
    trained on it to step 6 (evals at steps 4 and 6), once per test session: under xdist the
    first worker to ask builds it and the others wait on a file lock, then read it.

    Returns:
      namespace(overrides: the config overrides, data_dir included; data_dir; run: the
      workdir (read it, copy it to write); reference: {step: logged metrics} of that run;
      cache: the compilation cache that run filled, for `compilation_cache` in tests that
      train this model again).
    """
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shapes_run"
    root.mkdir(exist_ok=True)
    overrides = [f"data.data_dir={root / 'data'}", *SHAPES_OVERRIDES]
    done = root / "reference.json"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            from tfx_jax import stages
            from tfx_jax.config import load_config
            from tfx_jax.train.loop import train

            with compilation_cache(root / "xla_cache"):
                stages.prepare_all(load_config(REPO / "experiments/demo.py", overrides))
                cfg = load_config(REPO / "experiments/demo.py", [*overrides, "train.steps=6"])
                history = train(cfg, root / "run")
            done.write_text(json.dumps({h["step"]: h for h in history}))
    reference = {int(k): v for k, v in json.loads(done.read_text()).items()}
    return types.SimpleNamespace(
        overrides=overrides,
        data_dir=root / "data",
        run=root / "run",
        reference=reference,
        cache=root / "xla_cache",
    )


# Waiting on subprocesses. The suite must pass on a loaded 2-core machine (other test runs,
# xdist workers), where a child that needs 100 s idle may need several times that: every limit
# on a child is a base (what it needs idle, with headroom) stretched by how busy the machine is
# while it runs. Idle the limits are the bases; nothing waits longer when the child is done.
def timeout_scale() -> float:
    """How many times slower than idle a CPU-bound child runs now: `TFX_TEST_TIMEOUT_SCALE` if
    set, else the 1-minute load average per usable core, at least 1."""
    if os.environ.get("TFX_TEST_TIMEOUT_SCALE"):
        return float(os.environ["TFX_TEST_TIMEOUT_SCALE"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1.0, os.getloadavg()[0] / (cores or 1))


def scaled_timeout(base: float) -> float:
    """`base` seconds (the limit on an idle machine) times `timeout_scale()` now."""
    return base * timeout_scale()


def wait_all(procs, base: float) -> list[tuple]:
    """`communicate()` with each `subprocess.Popen` of `procs` (one or a list), all at once;
    returns their (stdout, stderr) pairs. The limit is `base` seconds times the largest
    `timeout_scale()` seen while waiting (re-read every poll: a machine that gets busy mid-run
    extends it). Past it, or as soon as one of several processes (one job's) exits non-zero,
    every process still running gets SIGABRT (a child started with PYTHONFAULTHANDLER=1, as
    `run_processes` does, prints every thread's Python stack), then SIGKILL 10 s later, and the
    test fails with each one's output so far."""
    import signal
    import subprocess
    import time

    procs = list(procs) if isinstance(procs, list | tuple) else [procs]
    start, scale = time.monotonic(), timeout_scale()
    outs: list[tuple | None] = [None] * len(procs)
    poll = 1 if len(procs) > 1 else 5
    while True:
        for i, proc in enumerate(procs):
            if outs[i] is None:
                left = base * scale - (time.monotonic() - start)
                try:  # a retried communicate() loses no output
                    outs[i] = proc.communicate(timeout=min(poll, max(left, 0.1)))
                except subprocess.TimeoutExpired:
                    pass
        if all(out is not None for out in outs):
            return outs
        scale = max(scale, timeout_scale())
        waited = time.monotonic() - start
        failed = [
            p.args for p, out in zip(procs, outs, strict=True) if out is not None and p.returncode
        ]
        if waited > base * scale or failed:
            break
    tails = []
    for proc in procs:  # stacks first, from every process still running
        if proc.poll() is None:
            proc.send_signal(signal.SIGABRT)
    for i, proc in enumerate(procs):
        if outs[i] is None:
            try:
                outs[i] = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                outs[i] = proc.communicate()
        text = "".join(x if isinstance(x, str) else (x or b"").decode() for x in outs[i])
        tails.append(f"--- {proc.args!r} (exit {proc.returncode}):\n{text[-6000:]}")
    why = (
        f"a process of the job failed while others still ran after {waited:.0f} s"
        if failed
        else f"subprocess still running after {waited:.0f} s (limit {base} s x load scale "
        f"{scale:.2f}; TFX_TEST_TIMEOUT_SCALE raises it)"
    )
    pytest.fail(why + ":\n" + "\n".join(tails))


def run_subprocess(cmd, *, timeout: float, capture_output: bool = False, **kwargs):
    """`subprocess.run(cmd, capture_output=..., **kwargs)` under `wait_all`'s limit: `timeout`
    is the base, in seconds on an idle machine."""
    import subprocess

    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.Popen(cmd, **kwargs)
    ((stdout, stderr),) = wait_all([proc], timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
