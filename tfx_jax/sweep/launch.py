"""`sweep launch`: a sweep's runs on a cluster through the project's launch scripts.

  slurm  ONE job array through launch/slurm.sh (--sweep FILE --array 0-(N-1)): array task i runs
         `python -m tfx_jax sweep run FILE --workdir ROOT --only-index i` on the job's nodes,
         which trains (and evaluates) run i and skips it when it is finished, so resubmitting
         the same array continues exactly the unfinished runs.
  xpk    one xpk workload per run through launch/xpk_multislice.sh (`xpk workload create`
         returns once the workload is queued; GKE schedules them).
  tpu    one queued-resource request per run through launch/tpu_queued.sh; each script waits
         for its slice and follows its training, so all N start at once, each with its output in
         a local log (a line when each ends).

The launch scripts' own arguments (nodes, partition, cluster, TPU type, ...) follow `--`; the
sweep gives each run's --config, --workdir, --name and --set. `--dry-run` is passed on to every
script, which prints every command and runs none.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from tfx_jax.config import ConfigError
from tfx_jax.sweep.expand import REPO_ROOT, Plan, split_spec, write_plan

LAUNCH = REPO_ROOT / "launch"
ENGINES = {"slurm": "slurm.sh", "xpk": "xpk_multislice.sh", "tpu": "tpu_queued.sh"}
SWEEP_SETS = ("--config", "--workdir", "--name", "--set", "--sweep", "--array")
NAME_LIMIT = {"xpk": 39, "tpu": 41, "slurm": 64}  # the scripts' --name rules


def job_name(prefix: str, index: int | None, engine: str) -> str:
    """A workload / queued-resource / job name: lowercase letters, digits and '-', starting
    with a letter, within the script's length limit (`prefix-i` per run)."""
    base = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-") or "sweep"
    if not base[0].isalpha():
        base = "s-" + base
    tail = "" if index is None else f"-{index}"
    return base[: NAME_LIMIT[engine] - len(tail)].rstrip("-") + tail


def _check_script_args(args: Sequence[str], engine: str) -> None:
    for a in args:
        if a in SWEEP_SETS or a.split("=", 1)[0] in SWEEP_SETS:
            raise ConfigError(
                f"sweep launch {engine}: {a} after '--' is the sweep's to set (each run's config, "
                "workdir, name and overrides come from the sweep file; put common overrides in "
                "its overrides={...})."
            )


def _script(engine: str, args: Sequence[str], dry_run: bool) -> list[str]:
    return ["bash", str(LAUNCH / ENGINES[engine]), *args, *(["--dry-run"] if dry_run else [])]


def launch(
    engine: str,
    plan: Plan,
    script_args: Sequence[str],
    dry_run: bool = False,
    name_prefix: str | None = None,
    max_parallel: int = 0,
    out: IO[str] | None = None,
) -> int:
    """Launches every run of `plan` on `engine` (see the module docstring).

    Args:
      engine: slurm | xpk | tpu.
      plan: the expanded sweep (validated).
      script_args: the launch script's own arguments.
      dry_run: the scripts print their commands, nothing is written or run.
      name_prefix: the job / workload names' prefix (default: the sweep's name).
      max_parallel: slurm: at most this many array tasks at once (0: no limit).

    Returns:
      The exit code: the script's (slurm), or 1 if any run's launch failed (xpk, tpu).
    """
    out = out or sys.stdout
    _check_script_args(script_args, engine)
    if engine in ("xpk", "tpu"):
        if not plan.root.startswith("gs://"):
            raise ConfigError(
                f"sweep launch {engine}: --workdir {plan.root}: use a gs:// path (every host "
                "writes its run's checkpoints there, and the runs resume from it)."
            )
        if plan.config_in_repo is None:
            raise ConfigError(
                f"sweep launch {engine}: the config {plan.config} is outside the repository; "
                "the scripts ship the committed project (git archive HEAD), so put it there."
            )
    if not dry_run:
        write_plan(plan)  # the runs' configs and sweep.json, before anything is submitted
    prefix = name_prefix or plan.name
    out.flush()
    if engine == "slurm":
        array = f"0-{len(plan.runs) - 1}" + (f"%{max_parallel}" if max_parallel else "")
        arg = split_spec(plan.spec)[1]
        args = ["--sweep", plan.file + (f":{arg}" if arg is not None else "")]
        args += ["--array", array, "--workdir", plan.root, "--name", job_name(prefix, None, engine)]
        return subprocess.run(_script(engine, [*args, *script_args], dry_run)).returncode
    commands = []
    for run in plan.runs:
        args = ["--config", plan.config_in_repo, "--workdir", run.workdir]
        args += ["--name", job_name(prefix, run.index, engine)]
        for s in run.sets:
            args += ["--set", s]
        commands.append((run, _script(engine, [*args, *script_args], dry_run)))
    if engine == "xpk" or dry_run:  # one after another: xpk returns once the workload is queued
        failed = 0
        for run, cmd in commands:
            print(f"# sweep run {run.index + 1}/{len(commands)}: {run.name}", file=out, flush=True)
            rc = subprocess.run(cmd).returncode
            if rc:
                failed += 1
                print(f"FAILED {run.name}: {ENGINES[engine]} exited {rc}", file=out, flush=True)
        return 1 if failed else 0
    return _launch_all_at_once(plan, commands, out)


def _launch_all_at_once(plan: Plan, commands, out: IO[str]) -> int:
    """tpu_queued.sh follows its run to the end: start them all, each into its own log."""
    logs = Path(tempfile.gettempdir()) / f"tfx_sweep_{plan.name}"
    logs.mkdir(parents=True, exist_ok=True)
    running = []
    for run, cmd in commands:
        log = logs / f"{run.name}.log"
        f = open(log, "ab")  # noqa: SIM115 (closed when the script ends, below)
        running.append((run, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT), f, log))
        print(f"started {run.name} (log: {log})", file=out, flush=True)
    failed = 0
    while running:
        for item in list(running):
            run, proc, f, log = item
            if proc.poll() is None:
                continue
            f.close()
            running.remove(item)
            if proc.returncode:
                failed += 1
                print(f"FAILED {run.name}: exit {proc.returncode} (log: {log})", file=out)
            else:
                print(f"ended {run.name} (log: {log})", file=out, flush=True)
        time.sleep(5 if running else 0)
    return 1 if failed else 0
