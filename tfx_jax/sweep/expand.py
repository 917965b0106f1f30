"""A sweep file → named runs, each the base config plus `--set` overrides, validated up front.

A sweep file (`experiments/sweeps/*.py`, big_vision style) defines `get_sweep(arg=None)`
returning a `Sweep`; `FILE.py:arg` passes `arg`. The runs, in order (the order is the SLURM array
index), are every entry of `runs` (default: one empty one) × every point of the cartesian `grid`
(the last key varies fastest) × every seed. A run's name is its overrides, `key=value` joined by
`__`, each key shortened to its last component where that is unique in the sweep, and the seed
last: `learning_rate=0.001__loss_weight=5__seed=1`; its group (what `collect` averages over
seeds) is the name without the seed. Every run's config is resolved (the same `--set` strings
the run will get) and checked before anything runs, so a misspelt key is one line naming the
run and the key.

    plan = expand(load_sweep("experiments/sweeps/tiny_lr.py"), "runs/sweeps/tiny_lr")
    write_plan(plan)  # ROOT/sweep.json, ROOT/<run>/config.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import itertools
import json
import re
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from tfx_jax.config import Config, ConfigError, apply_overrides, load_config, validate

REPO_ROOT = Path(__file__).resolve().parents[2]
PLAN_NAME = "sweep.json"
MAX_NAME = 200  # characters of a run's directory name before it is cut and hashed


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What a sweep file's `get_sweep(arg)` returns.

    Attributes:
      config: the base config, `experiments/x.py[:arg]` (relative to the repository root, or
        to the working directory, or absolute).
      grid: key -> list of values; every combination is a run (cartesian product).
      runs: a list of override dicts (variants); each is combined with every grid point.
      seeds: each run is repeated once per seed, set as `seed_key`.
      seed_key: the config key a seed sets.
      overrides: set in every run and left out of the names (steps, eval cadence, data paths).
      eval_args: None: training only; a list (possibly empty): after training, each run runs
        `python -m tfx_jax eval --workdir RUN *eval_args` (e.g. ["--num-prompts", "16"]).
      metrics: the eval metrics `collect` and `report` show (default: `collect.DEFAULT_METRICS`).
      name: the sweep's name (default: the file's stem, `_arg` appended).
    """

    config: str
    grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
    runs: Sequence[Mapping[str, Any]] = ()
    seeds: Sequence[int] = (0,)
    seed_key: str = "train.seed"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    eval_args: Sequence[str] | None = None
    metrics: Sequence[str] = ()
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: where it goes and the `--set` strings that make its config."""

    index: int
    name: str
    group: str
    seed: int
    overrides: dict[str, Any]  # what varies (variant + grid point), as written in the sweep
    sets: tuple[str, ...]  # every --set the run gets: common overrides, variant, grid, seed
    steps: int  # train.steps: the run is trained when this step's checkpoint exists
    workdir: str
    cfg: Config = dataclasses.field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("cfg")
        d["sets"] = list(self.sets)
        return d


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sweep expanded under a root directory."""

    spec: str  # the sweep file as given (FILE.py[:arg])
    file: str  # its absolute path
    name: str
    config: str  # the base config spec, FILE.py[:arg], with an absolute path
    config_in_repo: str | None  # the same relative to the repository root (None: outside it)
    root: str
    eval_args: tuple[str, ...] | None
    metrics: tuple[str, ...]
    runs: tuple[Run, ...]

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["runs"] = [r.to_json() for r in self.runs]
        return json.dumps(d, indent=1)


# ----------------------------------------------------------------------------- loading


def split_spec(spec: str) -> tuple[str, str | None]:
    """'dir/file.py:arg' -> ('dir/file.py', 'arg'); the ':' counts only in the file's name."""
    if ":" in Path(spec).name:
        path, arg = spec.rsplit(":", 1)
        return path, arg
    return spec, None


def load_sweep(spec: str) -> tuple[Sweep, str]:
    """Loads `get_sweep(arg)` from a sweep file (`FILE.py[:arg]`).

    Returns:
      (the Sweep, the sweep's name).
    Raises:
      ConfigError: a missing file, a file that fails to load, no get_sweep, not a Sweep.
    """
    path, arg = split_spec(spec)
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"Sweep file '{file}' does not exist (see experiments/sweeps/ for examples)."
        )
    module_spec = importlib.util.spec_from_file_location(f"tfx_sweep_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"Sweep file '{file}' line {e.lineno}: syntax error: {e.msg}.") from e
    except Exception as e:
        raise ConfigError(
            f"Sweep file '{file}' failed to load: {type(e).__name__}: {e}{_line(e, file)}."
        ) from e
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"Sweep file '{file}' must define get_sweep(arg=None) -> Sweep.")
    if arg is not None and not inspect.signature(module.get_sweep).parameters:
        raise ConfigError(f"Sweep file '{file}' was given ':{arg}' but get_sweep() takes none.")
    try:
        sweep = module.get_sweep(arg) if arg is not None else module.get_sweep()
    except Exception as e:
        raise ConfigError(
            f"get_sweep() in '{file}' raised {type(e).__name__}: {e}{_line(e, file)}."
        ) from e
    if not isinstance(sweep, Sweep):
        raise ConfigError(
            f"get_sweep() in '{file}' returned {type(sweep).__name__}, not tfx_jax.sweep.Sweep."
        )
    return sweep, sweep.name or file.stem + (f"_{arg}" if arg else "")


def _line(error: BaseException, file: Path) -> str:
    lines = [
        f.lineno
        for f in traceback.extract_tb(error.__traceback__)
        if Path(f.filename).resolve() == file.resolve()
    ]
    return f" (line {lines[-1]})" if lines else ""


def _resolve_config(spec: str, where: str) -> tuple[str, str | None]:
    """(absolute FILE[:arg], repo-relative FILE[:arg] or None) of the sweep's base config."""
    path, arg = split_spec(spec)
    tail = f":{arg}" if arg is not None else ""
    candidates = [Path(path)] if Path(path).is_absolute() else [REPO_ROOT / path, Path(path)]
    for c in candidates:
        if c.is_file():
            c = c.resolve()
            try:
                rel = str(c.relative_to(REPO_ROOT)) + tail
            except ValueError:
                rel = None
            return str(c) + tail, rel
    raise ConfigError(
        f"{where}: config '{path}' does not exist (relative paths are from the repository root "
        "or the working directory)."
    )


# ----------------------------------------------------------------------------- expansion


def format_value(value: Any, where: str) -> str:
    """A value as the `--set` string the config parser reads back as the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, list | tuple) and all(
        isinstance(v, int | float | str | bool) for v in value
    ):
        return json.dumps(list(value))
    raise ConfigError(
        f"{where}: {value!r} ({type(value).__name__}): give a number, string, bool or a list "
        "of them."
    )


def _name_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(_name_value(v) for v in value)
    return format_value(value, "")


def _short_names(keys: Sequence[str], seed_key: str) -> dict[str, str]:
    """key -> its name in run names: the last component where unique ('seed' is the seed's)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    out = {}
    for key, short in zip(keys, last, strict=True):
        out[key] = short if last.count(short) == 1 and short != "seed" else key
    out[seed_key] = "seed"
    return out


def _safe(name: str) -> str:
    """A directory name: characters outside [A-Za-z0-9._=,+-] become '-'; long names are cut
    and end in a hash of the whole, so they stay distinct."""
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "-", name)
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def _check_sweep(sweep: Sweep, where: str) -> None:
    if not isinstance(sweep.config, str) or not sweep.config:
        raise ConfigError(f"{where}: config must be a config file, e.g. 'experiments/tiny.py'.")
    if not isinstance(sweep.grid, Mapping):
        raise ConfigError(f"{where}: grid must be a dict of key -> list of values.")
    for key, values in sweep.grid.items():
        if isinstance(values, str) or not isinstance(values, Sequence) or not values:
            raise ConfigError(
                f"{where}: grid['{key}'] = {values!r}: give a non-empty list of values."
            )
    if isinstance(sweep.runs, Mapping) or not all(isinstance(r, Mapping) for r in sweep.runs):
        raise ConfigError(f"{where}: runs must be a list of override dicts.")
    seeds = list(sweep.seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{where}: seeds={sweep.seeds!r}: give a non-empty list of integers.")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds={sweep.seeds!r} repeats a seed.")
    if not isinstance(sweep.overrides, Mapping):
        raise ConfigError(f"{where}: overrides must be a dict of key -> value.")
    if sweep.eval_args is not None and (
        isinstance(sweep.eval_args, str) or not all(isinstance(a, str) for a in sweep.eval_args)
    ):
        raise ConfigError(f"{where}: eval_args must be a list of strings (or None: no eval).")
    varied = set(sweep.grid) | {k for r in sweep.runs for k in r}
    for key in sorted(varied | set(sweep.overrides)):
        if key == sweep.seed_key:
            raise ConfigError(f"{where}: '{key}' is the seed key: list the seeds in seeds=[...].")
    for key in sorted(set(sweep.grid) & {k for r in sweep.runs for k in r}):
        raise ConfigError(f"{where}: '{key}' is in both grid and runs: keep it in one.")
    for key in sorted(varied & set(sweep.overrides)):
        raise ConfigError(f"{where}: '{key}' is in overrides and also varied: keep it in one.")


def expand(sweep: Sweep, root: str, spec: str, name: str) -> Plan:
    """The sweep's runs under `root`, each config resolved and validated.

    Args:
      sweep: what the sweep file returned.
      root: the sweep's root directory (local or gs://); run i goes to ROOT/<its name>.
      spec: the sweep file as given (FILE.py[:arg]), for messages and the plan.
      name: the sweep's name.

    Raises:
      ConfigError: a malformed sweep, or a run whose config cannot be made (naming the run,
        its key and the fix).
    """
    where = f"sweep {spec}"
    _check_sweep(sweep, where)
    config, config_in_repo = _resolve_config(sweep.config, where)
    base = load_config(config)  # a bad base config fails here, with its own message
    variants = [dict(r) for r in sweep.runs] or [{}]
    keys = list(dict.fromkeys([k for v in variants for k in v] + list(sweep.grid)))
    short = _short_names(keys, sweep.seed_key)
    common = [
        f"{k}={format_value(v, f'{where}: overrides[{k!r}]')}" for k, v in sweep.overrides.items()
    ]
    runs: list[Run] = []
    seen: dict[str, int] = {}
    points = list(itertools.product(*sweep.grid.values()))
    for variant, point, seed in itertools.product(variants, points, sweep.seeds):
        overrides = {**variant, **dict(zip(sweep.grid, point, strict=True))}
        parts = [f"{short[k]}={_name_value(overrides[k])}" for k in keys if k in overrides]
        group = _safe("__".join(parts)) if parts else "base"
        run_name = _safe("__".join([*parts, f"seed={seed}"]))
        i = len(runs)
        label = f"{where}: run {i} '{run_name}'"
        if run_name in seen:
            raise ConfigError(
                f"{label} has the same name as run {seen[run_name]}: make their "
                "values differ in their first significant digits."
            )
        seen[run_name] = i
        sets = [
            *common,
            *(f"{k}={format_value(v, f'{label}: {k}')}" for k, v in overrides.items()),
            f"{sweep.seed_key}={seed}",
        ]
        try:
            cfg = apply_overrides(base, sets)
            validate(cfg)  # everything but the device count, which is the cluster's
        except ConfigError as e:
            raise ConfigError(f"{label}: {e}") from None
        workdir = str(epath.Path(root) / run_name)
        runs.append(
            Run(i, run_name, group, seed, overrides, tuple(sets), cfg.train.steps, workdir, cfg)
        )
    return Plan(
        spec=spec,
        file=str(Path(split_spec(spec)[0]).resolve()),
        name=name,
        config=config,
        config_in_repo=config_in_repo,
        root=str(root),
        eval_args=None if sweep.eval_args is None else tuple(sweep.eval_args),
        metrics=tuple(sweep.metrics),
        runs=tuple(runs),
    )


def plan_from_file(spec: str, root: str) -> Plan:
    sweep, name = load_sweep(spec)
    return expand(sweep, root, spec, name)


# ----------------------------------------------------------------------------- files


def _write_if_changed(path: epath.Path, text: str) -> None:
    """Writes `text` unless the file already holds it (array tasks may write the same plan)."""
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_plan(plan: Plan, runs: Sequence[Run] | None = None) -> None:
    """ROOT/sweep.json (every run) and each run's resolved config as ROOT/<run>/config.json
    (the file training writes there too), for `runs` (default: all)."""
    root = epath.Path(plan.root)
    _write_if_changed(root / PLAN_NAME, plan.to_json())
    for run in plan.runs if runs is None else runs:
        _write_if_changed(epath.Path(run.workdir) / "config.json", run.cfg.to_json())


def read_plan(root: str) -> dict[str, Any]:
    """ROOT/sweep.json as written by `write_plan`.

    Raises:
      FileNotFoundError: there is none (naming the command that writes it).
    """
    path = epath.Path(root) / PLAN_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no sweep here (python -m tfx_jax sweep run SWEEP_FILE --workdir {root} "
            "makes it; or pass the SWEEP_FILE)."
        )
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- state


def trained_step(workdir: str | epath.PathLike) -> int | None:
    """The newest finalized checkpoint step of a run, or None.

    Orbax's directory listing, not a CheckpointManager: a manager asks jax for the process
    index, which starts the accelerator backend, and `sweep run` must leave the devices to the
    runs it starts."""
    directory = epath.Path(workdir) / "checkpoints"
    steps = ocp.utils.checkpoint_steps(directory) if directory.is_dir() else []
    return max(steps) if steps else None


def eval_step(workdir: str | epath.PathLike) -> int | None:
    """The step RUN/eval.json evaluated, or None."""
    path = epath.Path(workdir) / "eval.json"
    if not path.exists():
        return None
    try:
        return int(json.loads(path.read_text())["step"])
    except (ValueError, KeyError, TypeError):
        return None


def status(run: Run | Mapping[str, Any], with_eval: bool) -> str:
    """'done', 'trained' (eval pending), 'partial (step k of N)' or 'not started'."""
    workdir, steps = (
        (run.workdir, run.steps) if isinstance(run, Run) else (run["workdir"], run["steps"])
    )
    step = trained_step(workdir)
    if step is None:
        return "not started"
    if step < steps:
        return f"partial (step {step} of {steps})"
    if with_eval and (eval_step(workdir) or -1) < steps:
        return "trained"
    return "done"
