"""The launch scripts: --help, the commands --dry-run prints (nothing is run: gcloud, xpk and
sbatch here only record that they were called), one-line errors (exit 2) for what is missing
or unknown, the pinned versions, SLURM's environment as jax reads it, and shellcheck."""

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_queued.sh", "xpk_multislice.sh", "slurm.sh"]
TPU = ["--project", "p", "--zone", "us-east5-a", "--config", "experiments/transfusion.py:0.76b"]
TPU += ["--workdir", "gs://b/run"]


@pytest.fixture
def sh(tmp_path):
    """Runs a launch script with gcloud / xpk / sbatch / docker on PATH as traps that log."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for tool in ("gcloud", "xpk", "sbatch", "srun", "docker"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\nexit 99\n')
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def run(script, *args):
        proc = subprocess.run(
            ["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=env
        )
        proc.calls = calls.read_text() if calls.exists() else ""
        return proc

    return run


def commands(stdout: str) -> list[str]:
    """The printed commands, in order ("+ cmd" lines)."""
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(sh, script):
    proc = sh(script, "--help")
    assert proc.returncode == 0, proc.stderr
    doc = "docs/GPU_CLUSTER.md" if script == "slurm.sh" else "docs/TPU_POD.md"
    assert f"launch/{script}" in proc.stdout and doc in proc.stdout
    assert "--dry-run" in proc.stdout


def test_tpu_single_slice_dry_run(sh):
    proc = sh("tpu_queued.sh", *TPU, "--type", "v5p-128", "--name", "tfx-a", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.calls == ""  # nothing ran
    assert "v5p-128: 64 chips, 16 worker(s) per slice x 1 slice(s) = 16 workers" in proc.stdout
    cmds = commands(proc.stdout)
    dryrun, archive, create, wait, scp, setup, start, follow, delete = cmds
    assert dryrun.endswith(
        "-m tfx_jax dryrun --config experiments/transfusion.py:0.76b --topology v5p-128"
    )
    assert re.fullmatch(r"git -C \S+ archive --format=tar.gz -o \S+/tfx_jax.tar.gz HEAD", archive)
    assert create == (
        "gcloud compute tpus queued-resources create tfx-a --project p --zone us-east5-a "
        "--accelerator-type v5p-128 --runtime-version v2-alpha-tpuv5 --node-id tfx-a"
    )
    assert "describe tfx-a" in wait and "until ACTIVE" in wait
    assert "scp" in scp and "tfx_jax.tar.gz" in scp and "--worker=all --node=all" in scp
    assert '"jax[tpu]==0.12.0.1" ".[tpu,gcs]"' in setup and "--worker=all --node=all" in setup
    assert "uv venv -q --python 3.12" in setup
    assert "tfx_train.sh" in start and "--worker=all --node=all" in start
    assert "--worker=0 --node=0" in follow and "tail" in follow
    # The job every worker runs (printed with the plan), and the delete comes last.
    assert (
        ".venv/bin/python -m tfx_jax train --config experiments/transfusion.py:0.76b "
        "--workdir gs://b/run --distributed auto >train.log"
    ) in proc.stdout
    assert delete == (
        "gcloud compute tpus queued-resources delete tfx-a --project p --zone us-east5-a "
        "--force --quiet"
    )


def test_tpu_multislice_spot_dry_run(sh):
    args = [*TPU, "--type", "v5e-16", "--slices", "2", "--spot", "--name", "tfx-b"]
    proc = sh("tpu_queued.sh", *args, "--set", "mesh.data=2", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "v5litepod-16: 16 chips, 4 worker(s) per slice x 2 slice(s) = 8 workers" in proc.stdout
    cmds = commands(proc.stdout)
    assert "--topology 2xv5e-16 --set mesh.data=2" in cmds[0]
    create = next(c for c in cmds if " create " in c)
    assert "--accelerator-type v5litepod-16 --runtime-version v2-alpha-tpuv5-lite" in create
    assert create.endswith("--node-count 2 --node-prefix tfx-b --spot")
    assert "--node-id" not in create
    assert "--distributed auto --set mesh.data=2 >train.log" in proc.stdout
    assert " delete tfx-b " in cmds[-1]


def test_tpu_skip_dryrun_and_keep(sh):
    proc = sh("tpu_queued.sh", *TPU, "--type", "v6e-8", "--skip-dryrun", "--keep", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "1 worker(s) per slice" in proc.stdout  # v6e-8 is one host
    assert not any("dryrun" in c for c in commands(proc.stdout))
    assert not any(" delete " in c for c in commands(proc.stdout))
    assert "--keep" in proc.stdout.splitlines()[-1] and "delete" in proc.stdout.splitlines()[-1]


def test_tpu_data_command_dry_run(sh):
    args = ["--project", "p", "--zone", "z", "--type", "v5p-8", "--config", "c.py"]
    proc = sh(
        "tpu_queued.sh", *args, "--command", "data", "--set", "data.data_dir=gs://b/d", "--dry-run"
    )
    assert proc.returncode == 0, proc.stderr
    assert not any("dryrun" in c for c in commands(proc.stdout))  # no train step to compile
    assert ".venv/bin/python -m tfx_jax data all --config c.py --distributed auto" in proc.stdout
    proc = sh("tpu_queued.sh", *args, "--command", "vae", "--workdir", "gs://b/r", "--dry-run")
    assert proc.returncode == 2 and "takes no --workdir" in proc.stderr


@pytest.mark.parametrize(
    "drop, message",
    [("--project", "--project is missing"), ("--zone", "--zone is missing")],
)
def test_tpu_missing_argument(sh, drop, message):
    args = [*TPU, "--type", "v5p-128", "--dry-run"]
    i = args.index(drop)
    proc = sh("tpu_queued.sh", *args[:i], *args[i + 2 :])
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {message}")
    assert proc.calls == ""


@pytest.mark.parametrize(
    "type_args, message",
    [
        ([], "--type is missing"),
        (["--type", "v3-8"], "--type v3-8 is not a TPU type"),
        (["--type", "v5p-100"], "--type v5p-100: no such slice"),
    ],
)
def test_tpu_missing_or_unknown_type(sh, type_args, message):
    proc = sh("tpu_queued.sh", *TPU, *type_args, "--dry-run")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {message}")


def test_tpu_local_workdir_is_refused(sh):
    args = [a if a != "gs://b/run" else "runs/x" for a in TPU]
    proc = sh("tpu_queued.sh", *args, "--type", "v5p-8", "--dry-run")
    assert proc.returncode == 2 and "use a gs:// path" in proc.stderr


def test_xpk_multislice_dry_run(sh):
    args = ["--cluster", "c1", "--type", "v5p-128", "--slices", "2", "--name", "tfx-c"]
    proc = sh("xpk_multislice.sh", *TPU, *args, "--set", "mesh.data=2", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.calls == ""
    assert "16 pod(s) per slice x 2 slice(s) = 32 pods" in proc.stdout
    cmds = commands(proc.stdout)
    assert "--topology 2xv5p-128 --set mesh.data=2" in cmds[0]
    assert any(" archive " in c and c.endswith(" HEAD") for c in cmds)
    (create,) = [c for c in cmds if c.startswith("xpk workload create")]
    assert "--cluster c1 --project p --zone us-east5-a --workload tfx-c" in create
    assert "--tpu-type v5p-128 --num-slices 2 --base-docker-image python:3.12" in create
    assert '"jax[tpu]==0.12.0.1" ".[tpu,gcs]"' in create
    assert "python -m tfx_jax train --config experiments/transfusion.py:0.76b" in create
    assert "--workdir gs://b/run --distributed auto --set mesh.data=2" in create
    assert "xpk workload delete --cluster c1" in proc.stdout


@pytest.mark.parametrize("drop", ["--project", "--zone", "--cluster", "--type", "--slices"])
def test_xpk_missing_argument(sh, drop):
    args = [*TPU, "--cluster", "c1", "--type", "v5p-128", "--slices", "2", "--dry-run"]
    i = args.index(drop)
    proc = sh("xpk_multislice.sh", *args[:i], *args[i + 2 :])
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {drop} is missing") and proc.stderr.count("\n") == 1


def test_slurm_dry_run(sh):
    args = ["--nodes", "2", "--gpus-per-node", "8", "--config", "experiments/transfusion.py:0.76b"]
    args += ["--workdir", "/shared/runs/x", "--partition", "gpu", "--set", "mesh.fsdp=16"]
    proc = sh("slurm.sh", *args, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.calls == ""
    lines = proc.stdout.splitlines()
    sbatch = {line.split()[1] for line in lines if line.startswith("#SBATCH ")}
    assert {"--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8"} <= sbatch  # 1 per GPU
    assert {"--partition=gpu", "--signal=TERM@120", f"--chdir={REPO}"} <= sbatch
    assert not any("per-task" in flag for flag in sbatch)  # each task sees its node's GPUs
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert srun.endswith(
        "-m tfx_jax train --config experiments/transfusion.py:0.76b --workdir /shared/runs/x "
        "--distributed auto --set mesh.fsdp=16"
    )
    assert "--kill-on-bad-exit=1" in srun
    assert commands(proc.stdout) == ["sbatch SCRIPT"]


@pytest.mark.parametrize("drop", ["--nodes", "--gpus-per-node", "--config", "--workdir"])
def test_slurm_missing_argument(sh, drop):
    args = ["--nodes", "2", "--gpus-per-node", "8", "--config", "c", "--workdir", "w", "--dry-run"]
    i = args.index(drop)
    proc = sh("slurm.sh", *args[:i], *args[i + 2 :])
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {drop} is missing") and proc.stderr.count("\n") == 1


def test_slurm_environment_is_what_jax_reads(monkeypatch):
    """`--distributed auto` is `jax.distributed.initialize()`: under srun, jax's SLURM cluster
    detection gives task 11 of 2 nodes x 8 GPUs process id 11 of 16, GPU 3 of its node, and the
    first node as coordinator (its port from the job id)."""
    from jax._src.clusters import ClusterEnv

    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "gpu[017-018]",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "11",
        "SLURM_LOCALID": "3",
        "SLURM_STEP_NUM_NODES": "2",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
    address, n, i, local = ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, None
    )
    assert (n, i, list(local)) == (16, 11, [3])
    assert address == f"gpu017:{4242 % 4096 + 65535 - 4095}"


def test_pinned_jax_agrees_with_pyproject():
    """The jax the TPU workers install is the one whose libtpu the `tpu` extra pins, and the
    one the `cuda` extra pins."""
    common = (LAUNCH / "common.sh").read_text()
    (jax_version,) = re.findall(r"^JAX_VERSION=(\S+)$", common, re.M)
    text = (REPO / "pyproject.toml").read_text()
    assert f"`jax[tpu]=={jax_version}` pins" in text  # the comment on the tpu extra
    extras = tomllib.loads(text)["project"]["optional-dependencies"]
    assert extras["cuda"] == [f"jax[cuda12]=={jax_version}"]
    assert set(extras) >= {"tpu", "gcs"}


def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (make test installs it with apt-get when it can)")
    scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    proc = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
