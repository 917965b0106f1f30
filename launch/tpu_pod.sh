#!/usr/bin/env bash
# Run the same `python -m tfx_jax train` on every host of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--set key=value ...]
#   launch/tpu_pod.sh my-v5p-128 us-east5-a experiments/transfusion.py:0.76b gs://bucket/runs/x
#
# Every host gets a copy of this repository (rsync of the working tree), creates its own .venv
# (`make venv`) and joins the job with `--distributed auto` (jax.distributed.initialize() reads
# the pod topology from the TPU metadata). Preemption / maintenance events send SIGTERM: the
# trainer saves at the next step boundary and exits 0; re-running this script resumes from the
# newest complete checkpoint in WORKDIR. WORKDIR should be a gs:// path every host can read.
# Nothing here is specific to the model: it only sets up machines and calls the entry point.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n 2,12p "$0"; exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REMOTE_DIR=tfx_jax
EXTRA=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all \
  "$(git rev-parse --show-toplevel)" "$TPU_NAME:~/$REMOTE_DIR" >/dev/null
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; cd ~/$REMOTE_DIR
  make venv PYTHON=python3 >/dev/null
  .venv/bin/pip install -q 'jax[tpu]'
  nohup .venv/bin/python -m tfx_jax train --distributed auto \
    --config $CONFIG --workdir $WORKDIR $EXTRA > train.log 2>&1 &
  echo \"\$(hostname): started, log in ~/$REMOTE_DIR/train.log\"
"
