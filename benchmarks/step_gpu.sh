#!/usr/bin/env bash
# Issue 27 in one GPU call: the train-step table on the paper mix (both text references, both
# MFUs; `train_step.py`) at the three sizes, and the attention kernel beside cuDNN on the three
# layouts (`attention.py`: short documents, the paper mix, one document per row).
#
#   source benchmarks/gpu_env.sh && bash benchmarks/step_gpu.sh OUT
#
# OUT gets step_<size>.txt and attention_<layout>.txt (markdown tables, appended as each run
# ends, so a call cut by its limit keeps what finished). Optional: SIZES ("0.16b:8 0.76b:4
# 1.4b:4", size:batch), LAYOUTS ("short paper one-doc"), IMPL (pallas_gpu), MIX (paper),
# PER_RUN_S (150), LEVER_SIZES ("0.16b:8": those sizes again with
# model.remat_policy=dots_no_batch_attention, the saved-residuals lever). Estimate (not measured): ~90 s a size (compile + 3 x 10 steps) and ~40 s a
# layout on an H100: ~6 min.
set -euo pipefail
OUT=${1:?usage: step_gpu.sh OUT}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"0.16b:8 0.76b:4 1.4b:4"}
LAYOUTS=${LAYOUTS:-"short paper one-doc"}
IMPL=${IMPL:-pallas_gpu}
MIX=${MIX:-paper}
PER_RUN_S=${PER_RUN_S:-150}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt" || true
for spec in $SIZES; do
  size=${spec%:*} B=${spec#*:}
  echo "== $size B=$B ($SECONDS s)"
  timeout "$PER_RUN_S" python3 benchmarks/train_step.py \
    --config "experiments/transfusion.py:$size,synthetic" --mix "$MIX" --steps 10 --warmup 3 \
    --set data.seq_len=4096 --set "data.global_batch_size=$B" --set "model.attention_impl=$IMPL" \
    2>&1 | grep -E '^\||÷|compile|Error' | tee "$OUT/step_$size.txt" || true
done
for spec in ${LEVER_SIZES-"0.16b:8"}; do
  size=${spec%:*} B=${spec#*:}
  echo "== $size B=$B remat dots_no_batch_attention ($SECONDS s)"
  timeout "$PER_RUN_S" python3 benchmarks/train_step.py --no-text-only \
    --config "experiments/transfusion.py:$size,synthetic" --mix "$MIX" --steps 10 --warmup 3 \
    --set data.seq_len=4096 --set "data.global_batch_size=$B" --set "model.attention_impl=$IMPL" \
    --set model.remat_policy=dots_no_batch_attention \
    2>&1 | grep -E '^\||compile|Error' | tee "$OUT/step_${size}_saved_residuals.txt" || true
done
for layout in $LAYOUTS; do
  echo "== attention $layout ($SECONDS s)"
  timeout "$PER_RUN_S" python3 benchmarks/attention.py --layout "$layout" --batch 4 \
    --seq-len 4096 --heads 16 --kv-heads 16 --head-dim 128 --impls xla,cudnn_causal,pallas_gpu \
    2>&1 | grep -vE '^(WARNING|I[0-9]{4}|W[0-9]{4})' | tee "$OUT/attention_$layout.txt" || true
done
echo "done ($SECONDS s)"
