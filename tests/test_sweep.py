"""Sweeps (`python -m tfx_jax sweep`): a sweep file expanded into named, validated runs; a 2 x 2
grid (learning rate x seed) of the tiny config trained one run after another in subprocesses,
one of them stopped half-way first and resumed; a second pass skipping them all; a failing run
reported while the next one trains; the collected table against the runs' own metrics; the HTML
report; and the cluster launches as dry runs of the launch scripts (nothing submitted).

Fast on CPU: 4 steps per run, one eval, and every child process compiles through one persistent
cache with XLA's optimizations off (runs differing by seed share their compiled steps)."""

import contextlib
import csv
import io
import json
import os
import statistics
import subprocess

import pytest
from conftest import REPO, compilation_cache
from PIL import Image

from tfx_jax import cli
from tfx_jax.sweep import expand
from tfx_jax.sweep import run as sweep_run

TINY = "experiments/tiny.py"
FAST = {
    "train.steps": 4,
    "train.log_every": 2,
    "train.eval_every": 4,
    "train.eval_batches": 1,
    "checkpoint.every_steps": 2,
    "optimizer.warmup_steps": 2,
    "optimizer.decay_steps": 4,  # fixed, so a run told to stop at step 2 compiles the same step
}
LRS = [0.003, 0.001]


def write_sweep(path, **fields):
    """A sweep file returning Sweep(**fields)."""
    args = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    path.write_text(
        f"from tfx_jax.sweep import Sweep\n\ndef get_sweep(arg=None):\n    return Sweep({args})\n"
    )
    return path


def tfx(*argv):
    """`python -m tfx_jax *argv` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def fast_children(cache):
    """Child processes compile through `cache` with XLA's optimizations off, on one CPU device:
    what is tested here is the sweep around the runs (sharding has its own tests), and one
    device saves each run ~1 s of its ~6."""
    env = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with compilation_cache(cache):
            yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- expand


def test_expand_names_and_configs(tmp_path):
    file = write_sweep(
        tmp_path / "ablation.py",
        config=TINY,
        runs=[{"model.patch_encoder": "linear"}, {"model.patch_encoder": "unet"}],
        grid={"diffusion.loss_weight": [1, 5.0], "data.seed": [7]},
        seeds=[0, 2],
        overrides={"train.steps": 3},
    )
    plan = expand.plan_from_file(str(file), str(tmp_path / "root"))
    names = [r.name for r in plan.runs]
    # Variants outermost, then the grid (last key fastest), seeds innermost; keys shortened to
    # their last component, except data.seed ("seed" is the sweep's seed).
    assert names[:3] == [
        "patch_encoder=linear__loss_weight=1__data.seed=7__seed=0",
        "patch_encoder=linear__loss_weight=1__data.seed=7__seed=2",
        "patch_encoder=linear__loss_weight=5.0__data.seed=7__seed=0",
    ]
    assert len(names) == 8 and len(set(names)) == 8
    assert [r.index for r in plan.runs] == list(range(8))
    last = plan.runs[-1]
    assert last.group == "patch_encoder=unet__loss_weight=5.0__data.seed=7"
    assert (last.cfg.model.patch_encoder, last.cfg.diffusion.loss_weight) == ("unet", 5.0)
    assert (last.cfg.data.seed, last.cfg.train.seed, last.cfg.train.steps) == (7, 2, 3)
    assert last.sets[0] == "train.steps=3" and last.sets[-1] == "train.seed=2"
    assert last.workdir == str(tmp_path / "root" / last.name)

    expand.write_plan(plan)
    saved = json.loads((tmp_path / "root" / "sweep.json").read_text())
    assert [r["name"] for r in saved["runs"]] == names
    config = json.loads((tmp_path / "root" / last.name / "config.json").read_text())
    assert config["model"]["patch_encoder"] == "unet" and config["train"]["seed"] == 2

    # Two keys ending alike keep their full names; the example sweep names its runs by lr.
    file = write_sweep(
        tmp_path / "steps.py", config=TINY, grid={"train.steps": [4], "vae.steps": [3]}
    )
    (only,) = expand.plan_from_file(str(file), str(tmp_path / "r2")).runs
    assert only.name == "train.steps=4__vae.steps=3__seed=0"
    plan = expand.plan_from_file(str(REPO / "experiments/sweeps/tiny_lr.py"), str(tmp_path))
    assert [r.name for r in plan.runs] == [
        "learning_rate=0.003__seed=0",
        "learning_rate=0.003__seed=1",
        "learning_rate=0.001__seed=0",
        "learning_rate=0.001__seed=1",
    ]


BAD = {
    "unknown key in the grid": (
        {"grid": {"optimizer.learnig_rate": [0.1]}},
        "run 0 'learnig_rate=0.1__seed=0': Unknown config key 'optimizer.learnig_rate'. "
        "Did you mean 'optimizer.learning_rate'?",
    ),
    "a value of the wrong type": (
        {"grid": {"train.steps": [4, "many"]}},
        "run 1 'steps=many__seed=0': train.steps='many': expected a value of type int",
    ),
    "a value the config refuses": (
        {"runs": [{"optimizer.learning_rate": -1.0}]},
        "run 0 'learning_rate=-1.0__seed=0': optimizer.learning_rate=-1.0 must be > 0",
    ),
    "an unknown key in overrides": ({"overrides": {"train.stepz": 3}}, "'train.stepz'"),
    "an empty grid axis": ({"grid": {"train.steps": []}}, "grid['train.steps'] = []"),
    "the seed key in the grid": ({"grid": {"train.seed": [1, 2]}}, "seeds=[...]"),
    "a key in overrides and grid": (
        {"grid": {"train.steps": [4]}, "overrides": {"train.steps": 5}},
        "'train.steps' is in overrides and also varied",
    ),
    "a missing base config": ({"config": "experiments/nope.py"}, "'experiments/nope.py' does not"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_expand_errors_are_one_line(tmp_path, case):
    fields, message = BAD[case]
    file = write_sweep(tmp_path / "bad.py", **{"config": TINY, **fields})
    code, out, err = tfx("sweep", "plan", file, "--workdir", tmp_path / "root")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"config error: sweep {file}") and message in err, err
    assert not (tmp_path / "root").exists()  # nothing is written before every run is checked


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "does not exist"),
        ("def get_sweep(:\n", "line 1: syntax error"),
        ("x = 1\n", "must define get_sweep"),
        ("def get_sweep(arg=None):\n    return {}\n", "returned dict, not tfx_jax.sweep.Sweep"),
    ],
)
def test_bad_sweep_files(tmp_path, text, message):
    file = tmp_path / "s.py"
    if text is not None:
        file.write_text(text)
    code, _, err = tfx("sweep", "run", file, "--workdir", tmp_path / "root")
    assert code == 2 and err.count("\n") == 1 and message in err, err


# ----------------------------------------------------------------------------- run


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """learning rate x seed (2 x 2), 4 steps each: run 0 first stopped at its step-2 checkpoint
    (what a kill after that save leaves), then `sweep run` twice."""
    tmp = tmp_path_factory.mktemp("sweep")
    file = write_sweep(
        tmp / "lr.py",
        config=TINY,
        grid={"optimizer.learning_rate": LRS},
        seeds=[0, 1],
        overrides=FAST,
    )
    root = tmp / "root"
    cache = tmp / "xla_cache"
    with fast_children(cache):
        plan = expand.plan_from_file(str(file), str(root))
        stopped = sweep_run.train_command(plan, plan.runs[0]) + ["--set", "train.steps=2"]
        subprocess.run(stopped, check=True, capture_output=True)
        assert expand.trained_step(plan.runs[0].workdir) == 2
        first = tfx("sweep", file, "--workdir", root)  # plain `sweep` is `sweep run`
        second = tfx("sweep", "run", file, "--workdir", root)
    return type(
        "Swept", (), dict(file=file, root=root, plan=plan, first=first, second=second, cache=cache)
    )


def _history(workdir):
    lines = (expand.epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_run_resumes_the_stopped_run_and_trains_the_rest(swept):
    code, out, err = swept.first
    assert code == 0, out + err
    lines = out.splitlines()
    names = [r.name for r in swept.plan.runs]
    assert f"[1/4] {names[0]}: train to step 4, resuming from step 2" in lines
    for k, name in enumerate(names[1:], 2):
        assert f"[{k}/4] {name}: train to step 4, from the start" in lines
    assert (
        sum(
            line.endswith(": done in " + line.split(" done in ")[-1])
            for line in lines
            if " done in " in line
        )
        == 4
    )
    assert "4 run(s): 4 done, 0 failed, 0 skipped" in out
    for run in swept.plan.runs:
        assert expand.trained_step(run.workdir) == 4
        log = (swept.root / run.name / "log.txt").read_text()
        assert log.count("==== tfx sweep: train") == 1
        steps = [h["step"] for h in _history(run.workdir) if "eval/lm_loss" in h]
        assert steps == ([2, 4] if run.index == 0 else [4])  # a run evaluates its last step
    log0 = (swept.root / names[0] / "log.txt").read_text()
    assert "resumed from" in log0 and "step 2" in log0


def test_a_second_run_skips_finished_runs(swept):
    code, out, _ = swept.second
    assert code == 0
    assert "4 run(s): 0 done, 0 failed, 4 skipped" in out
    assert out.count("skipped (finished (step 4))") == 4
    for run in swept.plan.runs:  # nothing was started again
        assert (swept.root / run.name / "log.txt").read_text().count("==== tfx sweep") == 1


def test_a_failing_run_is_reported_and_the_rest_go_on(swept, tmp_path):
    # mesh.data=3 passes the sweep's checks (the device count is the cluster's) and fails in the
    # run on these 8 devices; the second run (the grid's first learning rate) then trains.
    file = write_sweep(
        tmp_path / "fail.py",
        config=TINY,
        runs=[{"mesh.data": 3}, {}],
        overrides={**FAST, "optimizer.learning_rate": LRS[0]},
    )
    with fast_children(swept.cache):
        code, out, _ = tfx("sweep", "run", file, "--workdir", tmp_path / "root")
    assert code == 1
    log = tmp_path / "root" / "data=3__seed=0" / "log.txt"
    (failed,) = [line for line in out.splitlines() if "FAILED" in line]
    assert failed.startswith("[1/2] data=3__seed=0: FAILED train exited 2: config error: mesh=")
    assert failed.endswith(f"(log: {log})")
    assert "[2/2] seed=0: done in" in out
    assert "2 run(s): 1 done, 1 failed, 0 skipped" in out
    assert expand.trained_step(tmp_path / "root" / "seed=0") == 4


# ----------------------------------------------------------------------------- collect, report


def test_collect_table_is_the_runs_metrics(swept):
    code, out, err = tfx("sweep", "collect", "--workdir", swept.root)
    assert code == 0, err
    final = {
        r.name: [h for h in _history(r.workdir) if "eval/lm_loss" in h][-1] for r in swept.plan.runs
    }
    rows = list(csv.DictReader((swept.root / "sweep_results.csv").open()))
    assert {r["metric"] for r in rows} == {"eval/lm_loss", "eval/perplexity", "eval/diffusion_loss"}
    for lr in LRS:
        group = f"learning_rate={lr!r}"
        assert f"| {group} | 2 |" in out
        for metric in ("eval/lm_loss", "eval/diffusion_loss"):
            values = [final[f"{group}__seed={s}"][metric] for s in (0, 1)]
            (row,) = [
                r for r in rows if (r["group"], r["metric"], r["kind"]) == (group, metric, "final")
            ]
            assert int(row["n"]) == 2
            assert float(row["mean"]) == pytest.approx(statistics.fmean(values), rel=1e-12)
            assert float(row["std"]) == pytest.approx(statistics.stdev(values), rel=1e-12)
            assert (float(row["min"]), float(row["max"])) == (min(values), max(values))
    per_run = list(csv.DictReader((swept.root / "sweep_runs.csv").open()))
    for r in per_run:
        assert float(r["final"]) == final[r["run"]][r["metric"]] and r["final_step"] == "4"
    assert (swept.root / "sweep_results.md").read_text() in out

    code, out, _ = tfx(
        "sweep", "collect", "--workdir", swept.root, "--metrics", "eval/diffusion_loss,eval/nope"
    )
    assert code == 0 and "eval/lm_loss" not in out and "No run has: eval/nope." in out


def test_report_page_embeds_plots_and_lists_every_group(swept):
    code, out, err = tfx("sweep", "report", swept.file, "--workdir", swept.root)
    assert code == 0, err
    page = (swept.root / "sweep.html").read_text()
    assert str(swept.root / "sweep.html") in out
    images = page.split("src='data:image/png;base64,")[1:]
    assert len(images) == 2  # curves and metric bars
    import base64

    for chunk in images:
        Image.open(io.BytesIO(base64.b64decode(chunk.split("'")[0]))).verify()
    for lr in LRS:
        assert f"<th class='group'>learning_rate={lr!r}</th>" in page
    for run in swept.plan.runs:
        assert f"<td>{run.name}</td>" in page
    result = json.loads(json.dumps(list(csv.DictReader((swept.root / "sweep_results.csv").open()))))
    row = next(r for r in result if r["kind"] == "final" and r["metric"] == "eval/lm_loss")
    assert (
        f"data-group='{row['group']}' data-key='eval/lm_loss' data-kind='final' "
        f"data-value='{float(row['mean'])!r}'"
    ) in page


# ----------------------------------------------------------------------------- launch


@pytest.fixture
def traps(tmp_path, monkeypatch):
    """gcloud / xpk / sbatch on PATH as traps that log (as in tests/test_launch.py)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for tool in ("gcloud", "xpk", "sbatch", "srun", "docker"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\nexit 99\n')
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


def _commands(text):
    return [line[2:] for line in text.splitlines() if line.startswith("+ ")]


def test_launch_slurm_dry_run_is_one_array(swept, traps, capfd, tmp_path):
    root = tmp_path / "shared"
    code, _, err = tfx(
        "sweep",
        "launch",
        "slurm",
        swept.file,
        "--workdir",
        root,
        "--dry-run",
        "--max-parallel",
        "2",
        "--",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
    )
    out = capfd.readouterr().out
    assert code == 0, err
    assert _commands(out) == ["sbatch SCRIPT"] and not traps.exists()
    sbatch = {line.split()[1] for line in out.splitlines() if line.startswith("#SBATCH ")}
    assert {"--array=0-3%2", "--nodes=2", "--gpus-per-node=8", "--partition=gpu"} <= sbatch
    assert "--output=%x-%A_%a.log" in sbatch
    (srun,) = [line for line in out.splitlines() if line.startswith("srun ")]
    assert srun.endswith(
        f"-m tfx_jax sweep run {swept.file} --workdir {root} --distributed auto "
        '--only-index "$SLURM_ARRAY_TASK_ID"'
    )
    assert not root.exists()  # a dry run writes nothing


@pytest.mark.parametrize("engine", ["xpk", "tpu"])
def test_launch_xpk_and_tpu_dry_runs_are_one_per_run(swept, traps, capfd, engine):
    args = ["--project", "p", "--zone", "z", "--type", "v5p-8"]
    args += ["--cluster", "c", "--slices", "1"] if engine == "xpk" else []
    code, _, err = tfx(
        "sweep", "launch", engine, swept.file, "--workdir", "gs://b/sw", "--dry-run", "--", *args
    )
    out = capfd.readouterr().out
    assert code == 0, err
    assert not traps.exists()
    create = "xpk workload create" if engine == "xpk" else "queued-resources create"
    creates = [c for c in _commands(out) if create in c]
    assert len(creates) == 4
    for run, cmd in zip(swept.plan.runs, creates, strict=True):
        assert f"lr-{run.index} " in cmd  # the workload / queued resource name
    train = out if engine == "tpu" else "\n".join(creates)
    for run in swept.plan.runs:
        sets = " ".join(f"--set {s}" for s in run.sets)
        assert (
            f"-m tfx_jax train --config {TINY} --workdir gs://b/sw/{run.name} "
            f"--distributed auto {sets}"
        ) in train


def test_launch_errors_are_one_line(swept):
    code, _, err = tfx("sweep", "launch", "xpk", swept.file, "--workdir", "runs/x", "--dry-run")
    assert code == 2 and "use a gs:// path" in err and err.count("\n") == 1
    code, _, err = tfx(
        "sweep",
        "launch",
        "slurm",
        swept.file,
        "--workdir",
        "/s",
        "--dry-run",
        "--",
        "--nodes",
        "1",
        "--set",
        "a=b",
    )
    assert code == 2 and "--set after '--' is the sweep's" in err
    code, _, err = tfx("sweep", "run", swept.file, "--workdir", swept.root, "--only-index", "9")
    assert code == 2 and "the sweep has runs 0 to 3" in err
