#!/usr/bin/env bash
# Train on all GPUs of one host (one process drives every local GPU; NCCL collectives).
#
#   launch/gpu_host.sh CONFIG WORKDIR [--set key=value ...]
#   launch/gpu_host.sh experiments/transfusion.py:0.76b runs/x --set model.attention_impl=cudnn
#
# Use model.attention_impl=cudnn on GPUs (the XLA default attention is ~12x slower there).
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0), as the machine notes require.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n 2,8p "$0"; exit 2; fi
CONFIG=$1 WORKDIR=$2
shift 2
cd "$(git rev-parse --show-toplevel)"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec .venv/bin/python -m tfx_jax train --config "$CONFIG" --workdir "$WORKDIR" "$@"
