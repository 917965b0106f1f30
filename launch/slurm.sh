#!/usr/bin/env bash
# Train on the GPUs of N nodes of a SLURM cluster: writes an sbatch script (one process per GPU)
# and submits it. Thin: every task runs the same `python -m tfx_jax train --distributed auto`
# (with --sweep/--array, array task i runs `python -m tfx_jax sweep run ... --only-index i`).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'EOF'
Train on the GPUs of N nodes of a SLURM cluster, one process per GPU.

  launch/slurm.sh --nodes N --gpus-per-node G --config FILE[:arg] --workdir DIR
                  [--partition P] [--account A] [--time D-HH:MM:SS] [--cpus-per-task C]
                  [--name NAME] [--venv DIR] [--sbatch-out FILE] [--set key=value ...]
                  [--dry-run] [--help]
  launch/slurm.sh --sweep FILE[:arg] --array 0-N[%K] --workdir ROOT --nodes N --gpus-per-node G ...

  --workdir     a directory every node can write (shared file system, or gs://); a re-run
                resumes from its newest checkpoint
  --venv        the virtualenv the nodes run (default: this checkout's .venv), on a shared file
                system, made once with: make venv && .venv/bin/pip install -e '.[cuda]'
  --sbatch-out  where the sbatch script is written (default: a temporary file)
  --dry-run     print the sbatch script and the sbatch command instead of submitting
  --sweep       a sweep file (experiments/sweeps/): one job array, task i runs the sweep's run i,
                `python -m tfx_jax sweep run FILE --workdir ROOT --only-index i` (it trains,
                resumes or skips run i under ROOT/<its name>); made by `python -m tfx_jax sweep
                launch slurm`, which checks every run's config first. Takes no --config or --set
  --array       the array's task indices (sbatch --array), e.g. 0-11, or 0-11%4 for at most 4
                at once; only with --sweep. Each task gets the --nodes x --gpus-per-node above

The job: N nodes x G tasks (--ntasks-per-node=G), each task sees every GPU of its node
(--gpus-per-node=G, no per-task binding) and `srun` starts
`python -m tfx_jax train --config FILE --workdir DIR --distributed auto` in each: jax reads
SLURM's environment (SLURM_PROCID, SLURM_NTASKS, SLURM_STEP_NODELIST, SLURM_LOCALID), so process
i of N*G joins the job and drives GPU SLURM_LOCALID of its node; the coordinator is the first
node. SIGTERM 2 minutes before the time limit (--signal=TERM@120) makes the trainer save and
exit 0; resubmit the same command to continue. Step by step: docs/GPU_CLUSTER.md.
EOF
}

NODES="" GPUS="" CONFIG="" WORKDIR="" PARTITION="" ACCOUNT="" TIME=24:00:00 CPUS="" NAME=tfx
VENV=$REPO/.venv OUT="" SWEEP="" ARRAY=""
SETS=()
while (($#)); do
  case $1 in
    --nodes | --gpus-per-node | --config | --workdir | --partition | --account | --time | --cpus-per-task | --name | --venv | --sbatch-out | --set | --sweep | --array)
      need_value "$1" $#
      case $1 in
        --nodes) NODES=$2 ;;
        --gpus-per-node) GPUS=$2 ;;
        --config) CONFIG=$2 ;;
        --workdir) WORKDIR=$2 ;;
        --partition) PARTITION=$2 ;;
        --account) ACCOUNT=$2 ;;
        --time) TIME=$2 ;;
        --cpus-per-task) CPUS=$2 ;;
        --name) NAME=$2 ;;
        --venv) VENV=$2 ;;
        --sbatch-out) OUT=$2 ;;
        --set) SETS+=(--set "$2") ;;
        --sweep) SWEEP=$2 ;;
        --array) ARRAY=$2 ;;
      esac
      shift 2
      ;;
    --dry-run) DRY_RUN=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) die 2 "unknown argument $1 (see --help)." ;;
  esac
done

[[ -n $NODES ]] || die 2 "--nodes is missing: how many nodes the job takes, e.g. 2."
[[ -n $GPUS ]] || die 2 "--gpus-per-node is missing: the GPUs of each node, e.g. 8 (one process each)."
if [[ -n $SWEEP ]]; then
  [[ -n $ARRAY ]] || die 2 "--sweep needs --array 0-N (python -m tfx_jax sweep launch slurm gives it)."
  [[ -z $CONFIG && ${#SETS[@]} -eq 0 ]] || die 2 "--sweep takes no --config or --set: the sweep file gives each run's."
else
  [[ -z $ARRAY ]] || die 2 "--array is for --sweep (one task per run of a sweep file)."
  [[ -n $CONFIG ]] || die 2 "--config is missing, e.g. experiments/transfusion.py:0.76b."
fi
[[ -n $WORKDIR ]] || die 2 "--workdir is missing: a directory every node can write (shared file system or gs://)."
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die 2 "--nodes $NODES: give a whole number >= 1."
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die 2 "--gpus-per-node $GPUS: give a whole number >= 1."
[[ -n $CPUS && ! $CPUS =~ ^[1-9][0-9]*$ ]] && die 2 "--cpus-per-task $CPUS: give a whole number >= 1."
((DRY_RUN)) || [[ -x $VENV/bin/python ]] ||
  die 2 "--venv $VENV has no bin/python: make it once on a shared file system (make venv && .venv/bin/pip install -e '.[cuda]')."

TRAIN=("$VENV/bin/python" -m tfx_jax train --config "$CONFIG" --workdir "$WORKDIR" --distributed auto "${SETS[@]}")
TASK="" # appended unquoted: the array task's index, read when the task runs
if [[ -n $SWEEP ]]; then
  TRAIN=("$VENV/bin/python" -m tfx_jax sweep run "$SWEEP" --workdir "$WORKDIR" --distributed auto)
  # shellcheck disable=SC2016  # expanded by the task's shell, not here
  TASK=' --only-index "$SLURM_ARRAY_TASK_ID"'
fi
LOG=%x-%j.log # job name and id; an array task's adds its array id and index
if [[ -n $ARRAY ]]; then LOG=%x-%A_%a.log; fi
SBATCH=(
  "--job-name=$NAME"
  "--nodes=$NODES"
  "--ntasks-per-node=$GPUS"
  "--gpus-per-node=$GPUS"
  "--time=$TIME"
  "--signal=TERM@120"
  "--output=$LOG"
  "--chdir=$REPO"
)
if [[ -n $ARRAY ]]; then SBATCH+=("--array=$ARRAY"); fi
if [[ -n $CPUS ]]; then SBATCH+=("--cpus-per-task=$CPUS"); fi
if [[ -n $PARTITION ]]; then SBATCH+=("--partition=$PARTITION"); fi
if [[ -n $ACCOUNT ]]; then SBATCH+=("--account=$ACCOUNT"); fi

script() {
  echo "#!/usr/bin/env bash"
  echo "# Made by launch/slurm.sh: $NODES node(s) x $GPUS GPU(s) = $((NODES * GPUS)) processes, one per GPU."
  printf '#SBATCH %s\n' "${SBATCH[@]}"
  cat <<'EOF'
set -euo pipefail
# XLA reserves this fraction of its GPU's memory up front (its default: 0.75).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# NCCL: warnings only; set NCCL_SOCKET_IFNAME / NCCL_IB_HCA here if the cluster needs them
# (docs/GPU_CLUSTER.md).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
echo "job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES node(s) [$SLURM_JOB_NODELIST], $SLURM_NTASKS processes"
EOF
  # --kill-on-bad-exit: one failed process ends the job instead of leaving the rest hanging in
  # a collective. --cpu-bind=none: the input pipeline's threads may use every core of the task.
  echo "srun --kill-on-bad-exit=1 --cpu-bind=none $(show "${TRAIN[@]}")$TASK"
}

if ((DRY_RUN)); then
  echo "# sbatch script:"
  script
  echo "+ sbatch ${OUT:-SCRIPT}"
  exit 0
fi
if [[ -z $OUT ]]; then
  OUT=$(mktemp "${TMPDIR:-/tmp}/tfx_$NAME.XXXXXX.sbatch")
fi
script >"$OUT"
echo "# wrote $OUT"
run sbatch "$OUT"
