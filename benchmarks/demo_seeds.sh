#!/usr/bin/env bash
# The demo's recipe over training seeds (issue 25: the targets must hold on every seed and
# machine): builds the demo's data once, trains every variant x seed side by side, scores each
# final checkpoint exactly as `make demo` does (`eval`, 64 prompts per split, guidance 7) and
# prints one line per run with the three targets' metrics, then min / mean / max per variant.
#
#   On the GPU machine, from the repository root:
#     source benchmarks/gpu_env.sh && OUT=/some/dir bash benchmarks/demo_seeds.sh
#   On a CPU host (many cores; each run gets 8 simulated devices):
#     JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 OUT=... bash benchmarks/demo_seeds.sh
#
# $VARIANTS ("name|k=v k=v;name2|...") replaces the default list, $SEEDS (default "0 1 2"),
# $TEXT_GUIDANCE (e.g. "2 3": each checkpoint's captions again with that text guidance, shown
# as the variant NAME_tgS),
# $PARALLEL (runs at once, default: all). Everything lands in $OUT: seeds.log and the runs'
# eval.json / metrics.jsonl in seeds.tgz.
set -uo pipefail
OUT=${OUT:-/tmp/demo_seeds_out}
WORK=${WORK:-/tmp/demo_seeds}
SEEDS=${SEEDS:-0 1 2}
BUDGET_S=${BUDGET_S:-540}
PY=${PY:-python}
mkdir -p "$OUT" "$WORK/logs"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU
CFG=experiments/demo.py
DATA=(--set "data.data_dir=${DATA_DIR:-$WORK/data}")
for kv in ${EXTRA_SETS:-}; do DATA+=(--set "$kv"); done
START=$SECONDS
left() { local s=$((BUDGET_S - (SECONDS - START))); echo $((s > 1 ? s : 1)); }

if [ -n "${VARIANTS:-}" ]; then IFS=';' read -r -a VARIANTS <<<"$VARIANTS"; else
  VARIANTS=("demo|"); fi
GUIDANCE=${GUIDANCE:-7}

finish() {
  "$PY" - "$WORK/runs" >"$OUT/seeds.log" 2>&1 <<'EOF'
import json, pathlib, statistics, sys
keys = {"train draw": "eval/judge/train/attributes", "held-out draw": "eval/judge/heldout/attributes",
        "held-out caption": "eval/caption/heldout/attributes", "train count": "eval/judge/train/count",
        "train exact": "eval/judge/train/exact"}
goals = {"train draw": 0.95, "held-out draw": 0.90, "held-out caption": 0.90}
groups = {}
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/eval.json")):
    m = json.loads(f.read_text())["metrics"]
    name = f.parent.name
    vals = {k: m.get(v, float("nan")) for k, v in keys.items()}
    groups.setdefault(name.rsplit("_s", 1)[0], []).append(vals)
    print(name.ljust(28), "  ".join(f"{k} {v:6.1%}" for k, v in vals.items()))
print()
for g, rows in groups.items():
    parts = []
    for k in keys:
        xs = [r[k] for r in rows]
        ok = "" if k not in goals else (" met" if min(xs) >= goals[k] else " MISSED")
        parts.append(f"{k} {min(xs):.1%}/{statistics.mean(xs):.1%}/{max(xs):.1%}{ok}")
    print(f"{g} ({len(rows)} seeds, min/mean/max): " + "; ".join(parts))
EOF
  cat "$OUT/seeds.log"
  tar -czf "$OUT/seeds.tgz" -C "$WORK" logs $(cd "$WORK" && ls runs/*/eval.json runs/*/metrics.jsonl 2>/dev/null)
}
trap finish EXIT

timeout "$(left)" "$PY" -m tfx_jax data all --config $CFG "${DATA[@]}" >"$WORK/logs/data.log" 2>&1 \
  || { echo "data stages failed"; tail -20 "$WORK/logs/data.log"; exit 1; }
echo "data stages done at $((SECONDS - START)) s"

run_one() {
  local name=$1 sets=() kv
  for kv in $2; do sets+=(--set "$kv"); done
  timeout "$(left)" "$PY" -m tfx_jax train --config $CFG --workdir "$WORK/runs/$name" \
    "${DATA[@]}" "${sets[@]}" --set train.seed="$3" --set train.eval_every=0 \
    >"$WORK/logs/train_$name.log" 2>&1 || echo "train $name failed (rc $?)"
  timeout "$(left)" "$PY" -m tfx_jax eval --workdir "$WORK/runs/$name" --guidance "$GUIDANCE" \
    --no-report >"$WORK/logs/eval_$name.log" 2>&1 || echo "eval $name failed (rc $?)"
  local tg run=$WORK/runs/$name
  for tg in ${TEXT_GUIDANCE:-}; do  # the same checkpoint, captions with text guidance tg
    cp "$run/eval.json" "$run/eval_main.json"
    timeout "$(left)" "$PY" -m tfx_jax eval --workdir "$run" --guidance "$GUIDANCE" \
      --text-guidance "$tg" --no-report >"$WORK/logs/eval_${name}_tg$tg.log" 2>&1 ||
      echo "eval $name tg $tg failed (rc $?)"
    mkdir -p "$WORK/runs/${name%_s*}_tg${tg}_s$3"
    mv "$run/eval.json" "$WORK/runs/${name%_s*}_tg${tg}_s$3/eval.json"
    mv "$run/eval_main.json" "$run/eval.json"
  done
  echo "$name done at $((SECONDS - START)) s"
}

n=0
for v in "${VARIANTS[@]}"; do
  for s in $SEEDS; do
    run_one "${v%%|*}_s$s" "${v#*|}" "$s" &
    n=$((n + 1))
    if [ -n "${PARALLEL:-}" ] && [ $((n % PARALLEL)) -eq 0 ]; then wait; fi
  done
done
wait
