"""`sweep run`: a sweep's runs here, one after another, each `python -m tfx_jax train` (then
`eval` when the sweep asks) in a subprocess with its output in RUN/log.txt.

A finished run (its final step's checkpoint, and its eval.json when eval is asked) is skipped;
an unfinished one is started again, and the trainer resumes it from its newest checkpoint. A
failed run is one line (name, exit code, the log's last line, the log's path) and the others go
on; the summary at the end counts them, and the exit code is 1 if any failed.

Each run is its own process: a crash, an OOM or a stuck compile ends that run only, the devices
are freed between runs, and the process is exactly what a user (or a SLURM task) would run. The
children start in their own session, so SIGINT / SIGTERM reach them once, forwarded from here
(the trainer saves on the first and stops at once on a second); no run starts after a signal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

from etils import epath

from tfx_jax.config import ConfigError
from tfx_jax.sweep.expand import Plan, Run, eval_step, trained_step

LOG_NAME = "log.txt"


@dataclasses.dataclass
class Outcome:
    run: Run
    status: str  # done | skipped | failed | stopped | not started
    seconds: float = 0.0
    note: str = ""


def log_name() -> str:
    """RUN/log.txt; under srun, process i > 0 of a multi-process run writes log.proc<i>.txt."""
    proc = os.environ.get("SLURM_PROCID", "0")
    return LOG_NAME if proc == "0" else f"log.proc{proc}.txt"


def is_main_process() -> bool:
    return os.environ.get("SLURM_PROCID", "0") == "0"


def train_command(plan: Plan, run: Run, distributed: str = "off") -> list[str]:
    cmd = [sys.executable, "-m", "tfx_jax", "train", "--config", plan.config]
    cmd += ["--workdir", run.workdir]
    for s in run.sets:
        cmd += ["--set", s]
    return cmd + (["--distributed", distributed] if distributed != "off" else [])


def eval_command(plan: Plan, run: Run, distributed: str = "off") -> list[str]:
    cmd = [sys.executable, "-m", "tfx_jax", "eval", "--workdir", run.workdir]
    cmd += list(plan.eval_args or ())
    return cmd + (["--distributed", distributed] if distributed != "off" else [])


class _Signals:
    """Within: SIGINT and SIGTERM are recorded and forwarded to the running child (each signal
    once: the child is in its own session, so the terminal's Ctrl-C does not reach it too)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.child: subprocess.Popen | None = None
        self._before: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._before[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _log_file(path: epath.Path) -> Iterator[IO[bytes]]:
    """`path` opened for appending; a gs:// log is written locally and appended there after."""
    if "://" not in str(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:
            yield f
        return
    with tempfile.NamedTemporaryFile("w+b", suffix=".log") as f:
        yield f
        f.flush()
        f.seek(0)
        old = path.read_bytes() if path.exists() else b""
        path.write_bytes(old + f.read())


def _last_line(text: str) -> str:
    """The last non-empty line (progress bars end their lines with '\\r', not '\\n')."""
    for line in reversed(re.split(r"[\r\n]+", text)):
        if line.strip() and not line.startswith("===="):
            return line.strip()
    return "(empty log)"


def _attempt(cmd: list[str], log: epath.Path, what: str, signals: _Signals) -> tuple[int, str]:
    """Runs `cmd` with its output appended to `log`; (exit code, the last line it wrote)."""
    with _log_file(log) as f:
        start = f.tell()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"\n==== tfx sweep: {what} at {stamp}: {' '.join(cmd)}\n".encode())
        f.flush()
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        signals.child = child
        while True:
            try:
                rc = child.wait()
                break
            except KeyboardInterrupt:  # only if a handler was not installed; forward and wait
                child.send_signal(signal.SIGINT)
        signals.child = None
        f.flush()
        f.seek(start)
        return rc, _last_line(f.read().decode(errors="replace"))


def run_one(plan: Plan, run: Run, signals: _Signals, distributed: str, say) -> Outcome:
    """Trains (or resumes) one run and evaluates it when asked; never raises for its failure."""
    t0 = time.time()
    log = epath.Path(run.workdir) / log_name()
    with_eval = plan.eval_args is not None
    step = trained_step(run.workdir)
    if (
        step is not None
        and step >= run.steps
        and (not with_eval or (eval_step(run.workdir) or -1) >= run.steps)
    ):
        return Outcome(run, "skipped", note=f"finished (step {step})")
    if step is None or step < run.steps:
        start = "from the start" if step is None else f"resuming from step {step}"
        say(f"train to step {run.steps}, {start}")
        rc, last = _attempt(train_command(plan, run, distributed), log, "train", signals)
        step = trained_step(run.workdir)
        if signals.received is not None and (step or 0) < run.steps:
            where = f"at step {step}" if step is not None else "before its first checkpoint"
            return Outcome(run, "stopped", time.time() - t0, f"{where}, by a signal")
        if rc != 0:
            return Outcome(
                run, "failed", time.time() - t0, f"train exited {rc}: {last} (log: {log})"
            )
        if step is None or step < run.steps:
            note = f"train exited 0 without a checkpoint at step {run.steps}: {last} (log: {log})"
            return Outcome(run, "failed", time.time() - t0, note)
    if with_eval and (eval_step(run.workdir) or -1) < run.steps:
        say("eval")
        rc, last = _attempt(eval_command(plan, run, distributed), log, "eval", signals)
        if rc != 0:
            status = "stopped" if signals.received is not None else "failed"
            return Outcome(run, status, time.time() - t0, f"eval exited {rc}: {last} (log: {log})")
    return Outcome(run, "done", time.time() - t0, f"step {run.steps}")


def select(runs: Sequence[Run], only: Sequence[int] | None) -> list[Run]:
    """The runs with the given indices, in that order (all when None).

    Raises:
      ConfigError: an index the sweep does not have.
    """
    if only is None:
        return list(runs)
    for i in only:
        if not 0 <= i < len(runs):
            raise ConfigError(
                f"--only-index {i}: the sweep has runs 0 to {len(runs) - 1} ({len(runs)} in all)."
            )
    return [runs[i] for i in only]


def run_sweep(
    plan: Plan, runs: Sequence[Run], distributed: str = "off", out: IO[str] | None = None
) -> tuple[int, list[Outcome]]:
    """Runs `runs` of `plan` one after another (see the module docstring).

    Returns:
      (exit code: 0, 1 if any failed, 128 + signal if stopped by one; the outcomes).
    """
    out = out or sys.stdout
    quiet = not is_main_process()  # the other processes of an srun task say only failures

    def emit(line: str, always: bool = False) -> None:
        if always or not quiet:
            print(line, file=out, flush=True)

    outcomes: list[Outcome] = []
    n = len(runs)
    with _Signals() as signals:
        for k, run in enumerate(runs, 1):
            head = f"[{k}/{n}] {run.name}"
            if signals.received is not None:
                outcomes.append(Outcome(run, "not started"))
                continue
            outcome = run_one(plan, run, signals, distributed, lambda s, h=head: emit(f"{h}: {s}"))
            outcomes.append(outcome)
            if outcome.status == "failed":
                emit(f"{head}: FAILED {outcome.note}", always=True)
            else:
                took = f" in {outcome.seconds:.1f} s" if outcome.seconds else ""
                emit(f"{head}: {outcome.status}{took} ({outcome.note})")
    emit(summary(plan, outcomes))
    if signals.received is not None:
        return 128 + signals.received, outcomes
    return (1 if any(o.status == "failed" for o in outcomes) else 0), outcomes


def summary(plan: Plan, outcomes: Sequence[Outcome]) -> str:
    """The table printed at the end: one row per run, and the counts."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "failed", "skipped")}
    others = {o.status for o in outcomes} - set(counts)
    counts |= {s: sum(o.status == s for o in outcomes) for s in sorted(others)}
    width = max([len(o.run.name) for o in outcomes] + [3])
    lines = [
        f"sweep {plan.name}: {len(outcomes)} run(s): "
        + ", ".join(f"{v} {k}" for k, v in counts.items())
        + f"  ({plan.root})",
        f"  {'run':<{width}}  {'status':<11}  {'time':>8}  note",
    ]
    for o in outcomes:
        took = f"{o.seconds:.1f} s" if o.seconds else ""
        lines.append(f"  {o.run.name:<{width}}  {o.status:<11}  {took:>8}  {o.note}")
    return "\n".join(lines)
