#!/usr/bin/env bash
# The GPU sweep behind experiments/demo.py's settings (benchmarks/RESULTS.md, "Demo tuning"):
# builds the demo's data once, trains several variants side by side on one GPU (the same numerics
# as the CPU, only faster, so the step counts transfer), and scores their checkpoints with
# benchmarks/shapes_eval.py. On the GPU machine, from the repository root:
#   source benchmarks/gpu_env.sh && OUT=/some/dir bash benchmarks/demo_sweep.sh
# Everything lands in $OUT: sweep.log (the scores) and sweep.tgz (logs, metrics, JSON reports).
set -uo pipefail
OUT=${OUT:-/tmp/demo_sweep_out}
WORK=${WORK:-/tmp/demo_sweep}
STEPS=${STEPS:-400}
EVAL_STEPS=${EVAL_STEPS:-100,150,200,250,300,400}
NUM=${NUM:-64}  # prompts (and captioned images) per split
BUDGET_S=${BUDGET_S:-480}  # everything is stopped after this many seconds; reports keep what ran
mkdir -p "$OUT" "$WORK/logs"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU
CFG=experiments/demo.py
DATA=(--set "data.data_dir=${DATA_DIR:-$WORK/data}")  # stages already built there are reused
for kv in ${EXTRA_SETS:-}; do DATA+=(--set "$kv"); done  # e.g. a quick local check: vae.steps=20
START=$SECONDS
left() { local s=$((BUDGET_S - (SECONDS - START))); echo $((s > 1 ? s : 1)); }

# name and overrides (space-separated key=value) of each variant; $VARIANTS ("name|k=v k=v;...")
# replaces the list
DEFAULT_VARIANTS=(
  "base|"
  "cfp08_nl0|data.caption_first_prob=0.8 diffusion.noise_limit_image_first=false"
  "cfp08|data.caption_first_prob=0.8"
  "cfp02|data.caption_first_prob=0.2"
  "b16|data.global_batch_size=16"
  "d192|model.d_model=192 model.n_heads=6"
  "lr4e3|optimizer.learning_rate=4e-3"
)
if [ -n "${VARIANTS:-}" ]; then IFS=';' read -r -a VARIANTS <<<"$VARIANTS"; else
  VARIANTS=("${DEFAULT_VARIANTS[@]}"); fi

finish() {
  {
    echo "== sweep finished after $((SECONDS - START)) s"
    for f in "$WORK"/logs/vae_*.log; do
      echo "$f"; grep -h -E "vae wall|held-out PSNR|^vae_readback" "$f"
    done
    grep -h -E "^(==|vae_readback|t2i_|i2t_|  (train|heldout) )" "$WORK"/logs/eval_*.log
    grep -h -E "held-out PSNR|compiled train step|^step +(100|400) " "$WORK"/logs/*.log
  } >"$OUT/sweep.log" 2>&1
  tar -czf "$OUT/sweep.tgz" -C "$WORK" logs $(cd "$WORK" && ls -d runs/*/metrics.jsonl \
    runs/*/shapes_eval*.json 2>/dev/null)
}
trap finish EXIT

# VAE variants, each in its own data dir, scored by the judge on reconstructions (read-back),
# side by side with the main data stages.
VAES=(
  "v16_1000|vae.channels=16,32 vae.steps=1000 vae.batch_size=32 vae.learning_rate=2e-3"
  "v32_400|vae.channels=32,64 vae.steps=400 vae.batch_size=32 vae.learning_rate=2e-3"
  "v32_800|vae.channels=32,64 vae.steps=800 vae.batch_size=32 vae.learning_rate=2e-3"
  "v32_600b64|vae.channels=32,64 vae.steps=600 vae.batch_size=64 vae.learning_rate=2e-3"
  "v32flat_800|vae.channels=32 vae.steps=800 vae.batch_size=32 vae.learning_rate=2e-3"
  "v16_600lr5|vae.channels=16,32 vae.steps=600 vae.batch_size=32 vae.learning_rate=5e-3"
)
vae_variant() {
  local name=$1 sets=(--set "data.data_dir=$WORK/vae_$1" --set vae.log_every=1000) kv
  for kv in $2 ${VAE_EXTRA_SETS:-}; do sets+=(--set "$kv"); done
  local t0=$SECONDS
  { timeout "$(left)" python -m tfx_jax data build --config $CFG "${sets[@]}" &&
    timeout "$(left)" python -m tfx_jax vae --config $CFG "${sets[@]}" &&
    echo "vae wall $((SECONDS - t0)) s" &&
    timeout "$(left)" python benchmarks/shapes_eval.py --config $CFG --num "$NUM" "${sets[@]}"; } \
    >"$WORK/logs/vae_$name.log" 2>&1 || echo "vae $name failed (rc $?)"
  echo "vae $name done at $((SECONDS - START)) s"
}
for v in "${VAES[@]}"; do
  [ -n "${ONLY_VAE:-}" ] && [ "${v%%|*}" != "$ONLY_VAE" ] && continue
  vae_variant "${v%%|*}" "${v#*|}" &
done

timeout "$(left)" python -m tfx_jax data all --config $CFG "${DATA[@]}" >"$WORK/logs/data.log" 2>&1 \
  || { echo "data stages failed"; tail -20 "$WORK/logs/data.log"; exit 1; }
echo "data stages done at $((SECONDS - START)) s"

run_variant() {
  local name=$1 sets=() kv
  for kv in $2; do sets+=(--set "$kv"); done
  timeout "$(left)" python -m tfx_jax train --config $CFG --workdir "$WORK/runs/$name" \
    "${DATA[@]}" "${sets[@]}" --set train.steps="$STEPS" --set train.eval_every=0 \
    --set train.log_every=50 --set checkpoint.every_steps=50 --set checkpoint.keep=20 \
    >"$WORK/logs/train_$name.log" 2>&1 || echo "train $name failed (rc $?)"
  timeout "$(left)" python benchmarks/shapes_eval.py --workdir "$WORK/runs/$name" --num "$NUM" \
    --steps "$EVAL_STEPS" >"$WORK/logs/eval_$name.log" 2>&1 || echo "eval $name failed (rc $?)"
  if [ "$name" = base ] && [ -z "${NO_GUIDANCE:-}" ]; then  # guidance, on base's last step
    for g in 1.5 5; do
      timeout "$(left)" python benchmarks/shapes_eval.py --workdir "$WORK/runs/$name" \
        --num "$NUM" --steps "${EVAL_STEPS##*,}" --guidance $g --out "$WORK/runs/$name/shapes_eval_g$g.json" \
        >"$WORK/logs/eval_${name}_g$g.log" 2>&1 || echo "eval $name g$g failed (rc $?)"
    done
  fi
  echo "$name done at $((SECONDS - START)) s"
}

for v in "${VARIANTS[@]}"; do
  [ -n "${ONLY:-}" ] && [ "${v%%|*}" != "$ONLY" ] && continue
  run_variant "${v%%|*}" "${v#*|}" &
done
wait
