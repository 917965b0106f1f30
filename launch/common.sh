# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source this
# Shared by the launch scripts (sourced, not run): one-line errors, printing commands for
# --dry-run, the pinned versions, the committed project as an archive, and TPU slice names.

# The jax whose libtpu pyproject.toml's `tpu` extra pins, and whose CUDA wheels its `cuda` extra
# pins (tests/test_launch.py checks the three agree). jax >= 0.11 needs Python >= 3.12.
JAX_VERSION=0.12.0.1
PYTHON_VERSION=3.12

die() { # die CODE MESSAGE: one line on stderr, then exit CODE
  echo "error: $2" >&2
  exit "$1"
}

# A command as one copy-pasteable line: words with shell-special characters single-quoted.
show() {
  local out="" word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${out% }"
}

DRY_RUN=${DRY_RUN:-0}
run() { # run a command, or print it ("+ cmd") under --dry-run
  if ((DRY_RUN)); then
    echo "+ $(show "$@")"
  else
    "$@"
  fi
}

need_value() { # need_value FLAG NUMBER_OF_ARGS_LEFT
  (($2 >= 2)) || die 2 "$1 needs a value (see --help)."
}

REPO=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
PY=${PYTHON:-$REPO/.venv/bin/python}
[[ -x $PY ]] || PY=python3

# archive OUT.tar.gz: the committed project (git archive HEAD), without virtualenvs, data
# caches or runs, which are not tracked.
archive() {
  if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no) ]]; then
    echo "# note: uncommitted changes are not shipped (git archive HEAD)" >&2
  fi
  run git -C "$REPO" archive --format=tar.gz -o "$1" HEAD
}

# tpu_slice TYPE SLICES: checks a Cloud TPU type and sets TYPE (gcloud's name: v5e-N becomes
# v5litepod-N), CHIPS and WORKERS (hosts) per slice, DEFAULT_RUNTIME (the TPU VM image) and
# TOPO (the name `python -m tfx_jax dryrun --topology` takes, Kx-prefixed for K slices).
# v4-N and v5p-N count TensorCores (2 per chip), v5litepod-N and v6e-N chips; hosts hold 4
# chips, except the single-host slices of up to 8 v5e/v6e chips (or up to 4 v4/v5p chips).
tpu_slice() {
  local gen size sizes
  [[ $1 =~ ^(v4|v5p|v5litepod|v5e|v6e)-([0-9]+)$ ]] ||
    die 2 "--type $1 is not a TPU type this script knows: use v4-N, v5p-N, v5litepod-N (v5e-N) or v6e-N, e.g. v5p-128."
  gen=${BASH_REMATCH[1]} size=${BASH_REMATCH[2]}
  [[ $gen == v5e ]] && gen=v5litepod
  case $gen in
    v4 | v5p) sizes="8 16 32 64 128 256 512 1024 2048 4096" CHIPS=$((size / 2)) ;;
    *) sizes="1 4 8 16 32 64 128 256" CHIPS=$size ;;
  esac
  [[ " $sizes " == *" $size "* ]] || die 2 "--type $1: no such slice; $gen sizes are $sizes."
  TYPE=$gen-$size
  case $gen in
    v4) DEFAULT_RUNTIME=tpu-ubuntu2204-base TOPO=v4-$size ;;
    v5p) DEFAULT_RUNTIME=v2-alpha-tpuv5 TOPO=v5p-$size ;;
    v5litepod) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite TOPO=v5e-$size ;;
    v6e) DEFAULT_RUNTIME=v2-alpha-tpuv6e TOPO=v6e-$size ;;
  esac
  WORKERS=$((CHIPS <= 4 ? 1 : CHIPS / 4))
  if [[ $gen == v5litepod || $gen == v6e ]] && ((CHIPS == 8)); then WORKERS=1; fi
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die 2 "--slices $2: give a whole number >= 1."
  if (($2 > 1)); then TOPO=$2x$TOPO; fi
}

# dryrun_first SKIP TOPOLOGY CONFIG [--set k=v ...]: compile for the slice here before paying
# for it; a config that does not compile or fit stops the launch (exit 1).
dryrun_first() {
  local skip=$1 topo=$2 config=$3
  shift 3
  if ((skip)); then
    echo "# --skip-dryrun: not compiling for $topo first"
  else
    run "$PY" -m tfx_jax dryrun --config "$config" --topology "$topo" "$@" ||
      die 1 "the dry run for $topo failed (it does not compile or does not fit): fix the config, or pass --skip-dryrun."
  fi
}
