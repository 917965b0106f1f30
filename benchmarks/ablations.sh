#!/usr/bin/env bash
# Issue 26: the paper's ablations (Transfusion Table 5) as sweeps on one GPU, side by side.
#
#   source benchmarks/gpu_env.sh && BUDGET_S=540 bash benchmarks/ablations.sh OUT
#
# Builds the shapes data once (`data all --config experiments/shapes_ablation.py`: shapes_gpu's
# data dir), plans experiments/sweeps/{attention,patch,noise_limit,loss_weight}.py under
# ROOT/<file>, and trains + evaluates their runs K at a time on the one GPU
# (XLA_PYTHON_CLIENT_PREALLOCATE=false), each `python -m tfx_jax sweep run FILE --workdir
# ROOT/<file> --only-index I`. A run whose resolved config another file already has is trained
# once: its directory is a link to the first (39 runs, 27 distinct). Runs start seed-major (every
# distinct config's seed 0 first), none after BUDGET_S - COLLECT_S - MIN_RUN_S; at BUDGET_S -
# COLLECT_S those still going get SIGTERM (they save a checkpoint and resume on the next call).
# Then `sweep collect` and `sweep report` per file; OUT gets, per file, sweep_results.md/.csv,
# sweep_runs.csv and sweep.html, each evaluated run's eval.json, metrics.jsonl and config.json
# (OUT/runs/<file>/<run>/) and the logs (OUT/logs.tgz).
#
# Estimate (not measured; from benchmarks/RESULTS.md's shapes_gpu figures on one H200: the
# 15M-parameter model's 128 x 256-token step at 25 ms, 1.3M tokens/s, 6,500 steps in 269 s; data
# stages 49 s; two 128-prompt evals in ~80 s): a run here is 2,000 steps of 48 rows (25M tokens),
# ~20 s of GPU at that rate (~40 s alone with its 2 Grain workers) + ~30 s start and compile +
# ~30 s eval (64 prompts a split, images and captions) -> about 1.5 min alone. Side by side the
# GPU is the shared limit, so the 27 runs' steps take ~27 x 20 = 540 s while starts, compiles and
# evals overlap them; plus data (~50 s) and each call's unshared ends (~100 s): ~13 min on an H200,
# ~16 min if an H100 runs this small model ~1.3x slower: two calls of BUDGET_S=540. Not counted:
# the in-domain FD `eval` now computes trains its classifier once per data dir (cached there).
#
# Two calls: on the same warm machine the second finds the data, skips finished runs and resumes
# cut ones. On a fresh one, copy the first call's OUT/runs into the tree (it travels: untracked,
# not ignored) and pass PREVIOUS=that/dir: its evaluated runs count as done and enter the tables.
# Optional: K (4 runs at once), ROOT (runs/ablations), FILES (the four), ARG ("smoke": the files'
# CPU-seconds variant, for a smoke run on a CPU), MIN_RUN_S (90), COLLECT_S (60), EXPORT_DATA=1
# (the data dir as OUT/data.tgz, to carry to a fresh machine so both calls share one VAE).
set -euo pipefail
OUT=${1:?usage: ablations.sh OUT}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
BUDGET_S=${BUDGET_S:-540}
COLLECT_S=${COLLECT_S:-60}
MIN_RUN_S=${MIN_RUN_S:-90}
K=${K:-4}
ROOT=${ROOT:-runs/ablations}
FILES=${FILES:-"attention patch noise_limit loss_weight"}
ARG=${ARG:+:$ARG}
PREVIOUS=${PREVIOUS:-}
CONFIG="$HERE/experiments/shapes_ablation.py$ARG"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
LOGS=$(mktemp -d)
mkdir -p "$ROOT"
tfx() { python3 -m tfx_jax "$@"; }
sweep_file() { echo "$HERE/experiments/sweeps/$1.py$ARG"; }

tfx data all --config "$CONFIG" >"$LOGS/data.log" 2>&1 || { tail -30 "$LOGS/data.log"; exit 1; }
echo "data stages done ($SECONDS s)"
if [ "${EXPORT_DATA:-0}" = 1 ]; then
  dir=$(python3 -c "from tfx_jax.config import load_config; print(load_config('$CONFIG').data.data_dir)")
  tar czf "$OUT/data.tgz" "$dir" && echo "data dir $dir -> $OUT/data.tgz"
fi

# The queue: "seed file index name" of each distinct run; repeats become links to the first.
declare -A first=()
queue=()
total=0
for f in $FILES; do
  tfx sweep plan "$(sweep_file "$f")" --workdir "$ROOT/$f" >"$LOGS/plan_$f.txt"
  while read -r i name _; do
    total=$((total + 1))
    dir="$ROOT/$f/$name"
    if [ -n "$PREVIOUS" ] && [ -f "$PREVIOUS/$f/$name/eval.json" ] && [ ! -f "$dir/eval.json" ]; then
      cp "$PREVIOUS/$f/$name"/*.json* "$dir/"
    fi
    key=$(sha1sum <"$dir/config.json" | cut -d' ' -f1)
    if [ -z "${first[$key]:-}" ]; then
      first[$key]=$dir
      queue+=("${name##*seed=} $f $i $name")
    elif [ ! -L "$dir" ] && [ "$(ls -A "$dir")" = config.json ]; then
      rm -r "$dir" && ln -s "$(cd "${first[$key]}" && pwd)" "$dir"
    fi
  done < <(grep -E '^ +[0-9]+ ' "$LOGS/plan_$f.txt")
done
mapfile -t queue < <(printf '%s\n' "${queue[@]}" | sort -s -n -k1,1)
echo "$total runs, ${#queue[@]} distinct, $K at a time (runs stop at $((BUDGET_S - COLLECT_S)) s)"

run() {  # file index name seconds: one sweep run, cut after `seconds`
  local t0=$SECONDS rc=0 log="$LOGS/$1.$2.log"
  timeout -k 30 "$4" python3 -m tfx_jax sweep run "$(sweep_file "$1")" --workdir "$ROOT/$1" \
    --only-index "$2" >"$log" 2>&1 || rc=$?
  echo "$(date +%T) $1[$2] $3: $(grep -E '^\[1/1\]' "$log" | tail -1 | sed 's/^[^:]*: //')" \
    "(rc $rc, $((SECONDS - t0)) s)"
}

left_out=0
for entry in "${queue[@]}"; do
  read -r _ f i name <<<"$entry"
  [ -f "$ROOT/$f/$name/eval.json" ] && continue  # evaluated here or in PREVIOUS
  while [ "$(jobs -rp | wc -l)" -ge "$K" ]; do wait -n || true; done
  left=$((BUDGET_S - COLLECT_S - SECONDS))
  if [ "$left" -lt "$MIN_RUN_S" ]; then left_out=$((left_out + 1)); continue; fi
  echo "$(date +%T) start $f[$i] $name ($left s left)"
  run "$f" "$i" "$name" "$left" &
done
wait
echo "runs done ($SECONDS s); $left_out not started"

for f in $FILES; do
  tfx sweep collect "$(sweep_file "$f")" --workdir "$ROOT/$f" >"$LOGS/collect_$f.txt" 2>&1 || true
  tfx sweep report "$(sweep_file "$f")" --workdir "$ROOT/$f" >>"$LOGS/collect_$f.txt" 2>&1 || true
  mkdir -p "$OUT/$f"
  cp "$ROOT/$f"/sweep_results.md "$ROOT/$f"/*.csv "$ROOT/$f"/sweep.html "$OUT/$f/" 2>/dev/null || true
  cat "$ROOT/$f/sweep_results.md" 2>/dev/null || tail -5 "$LOGS/collect_$f.txt"
  for dir in "$ROOT/$f"/*/; do
    [ -f "$dir/eval.json" ] || continue
    mkdir -p "$OUT/runs/$f/$(basename "$dir")"
    cp -L "$dir"/eval.json "$dir"/metrics.jsonl "$dir"/config.json "$OUT/runs/$f/$(basename "$dir")/"
  done
done
for f in $FILES; do
  for dir in "$ROOT/$f"/*/; do
    [ -L "${dir%/}" ] || [ ! -f "$dir/log.txt" ] || cp "$dir/log.txt" "$LOGS/$f.$(basename "$dir").log.txt"
  done
done
tar czf "$OUT/logs.tgz" -C "$LOGS" .
done_runs=$(find "$OUT/runs" -name eval.json 2>/dev/null | wc -l)
echo "all done ($SECONDS s): $done_runs of the $total runs evaluated; OUT: $OUT"
