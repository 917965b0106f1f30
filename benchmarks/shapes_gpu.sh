#!/usr/bin/env bash
# Issue 14 item 5: the multi-object shapes config on one GPU, with the captioning lever.
#
#   source benchmarks/gpu_env.sh && VARIANTS="nolmb base" DEADLINE=545 MIN_TRAIN=240 bash benchmarks/shapes_gpu.sh OUT [--set k=v ...]
#
# Builds the data stages of experiments/shapes_gpu.py once, then trains its variants one after
# the other — the default recipe ("base", caption first 80%), "cfp05" and "cfp02" (caption first
# 50% / 20%), "nolmb" (no LM loss on captions before their image) — and scores each with
# benchmarks/shapes_eval.py on NUM prompts per split (seed 0) at guidance 3 and 7, one variant
# after the other (each gets the whole GPU and its own TRAIN_LIMIT).
# Logs stream to stdout; the eval JSON goes to OUT/shapes_gpu.tgz.
# DEADLINE (seconds since the start, optional) fits the variants into one call: each training is
# capped so its scoring (EVAL_RESERVE, 80 s) ends by then; a variant that would get under MIN_TRAIN
# (60 s) is skipped.
# Extra `--set k=v` arguments go to every stage and training (the CPU smoke test uses them).
set -euo pipefail
OUT=${1:?usage: shapes_gpu.sh OUT [--set k=v ...]}
shift
NUM=${NUM:-128}
WORK=${WORK:-runs/shapes_gpu_bench}
VARIANTS=${VARIANTS:-"base nolmb"}
LOGS=$(mktemp -d)
mkdir -p "$WORK" "$OUT"
cfg() { if [ "$1" = base ]; then echo experiments/shapes_gpu.py; else echo "experiments/shapes_gpu.py:$1"; fi; }
python3 -m tfx_jax data all --config experiments/shapes_gpu.py "$@" >"$LOGS/data.log" 2>&1 \
  || { tail -30 "$LOGS/data.log"; exit 1; }
echo "data stages done ($SECONDS s)"
for v in $VARIANTS; do
  start=$SECONDS
  limit=${TRAIN_LIMIT:-0}
  if [ -n "${DEADLINE:-}" ]; then
    left=$((DEADLINE - SECONDS - ${EVAL_RESERVE:-80}))
    if [ "$left" -lt "${MIN_TRAIN:-60}" ]; then echo "$v: skipped, ${left} s left before DEADLINE"; continue; fi
    if [ "$limit" -eq 0 ] || [ "$limit" -gt "$left" ]; then limit=$left; fi
  fi
  # TRAIN_LIMIT (seconds) caps a training on a lent machine; the 1,000-step checkpoints keep
  # a cut run scorable (the step reached is in the eval's output).
  echo "$v: training (limit ${limit} s; 0 = none)"
  timeout "$limit" python3 -m tfx_jax train --config "$(cfg "$v")" --workdir "$WORK/$v" \
    --set train.log_every=500 --set checkpoint.every_steps=1000 "$@" 2>&1 | tr '\r' '\n' | grep -oE "(step|eval) +[0-9]+ [a-z].*" | sed "s/^/$v /" || true
  echo "$v: trained in $((SECONDS - start)) s"
  for g in 7 3; do
    python3 benchmarks/shapes_eval.py --workdir "$WORK/$v" --num "$NUM" --guidance "$g" \
      --out "$LOGS/eval_${v}_g$g.json" 2>&1 | grep -E "^(== |t2i|i2t|vae|  )" | sed "s/^/$v g$g: /" || true
    tar czf "$OUT/shapes_gpu.tgz" -C "$LOGS" .
  done
done
echo "all done ($SECONDS s)"
