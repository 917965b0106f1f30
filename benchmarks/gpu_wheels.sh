#!/usr/bin/env bash
# Wheels for a bare GPU machine that has jax/flax/optax/orbax but not the data stack.
#
# Run here (a machine with PyPI access) once:   bash benchmarks/gpu_wheels.sh
# Then, on the GPU machine, from the repository root (the .whl folder copied along):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD
# What was missing on the lent H200 (jax 0.11.2, Python 3.12; benchmarks/RESULTS.md): grain,
# tensorflow-datasets, array-record, tensorboardX and their pure-Python needs; tokamax and its
# needs for the GPU attention kernel (`xprof` is stubbed: tokamax imports it only for profiling);
# transfusion-pytorch and its pure-Python needs for the peer comparison (torch is preinstalled).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"
PY=$(realpath "${PYTHON:-.venv/bin/python}")
WHEELS=(
  grain==0.2.18 tensorflow-datasets==4.9.10 array-record==0.8.6 tensorboardX==2.6.5 portpicker
  immutabledict dm-tree simple-parsing docstring-parser tensorflow-metadata
  googleapis-common-protos termcolor toml etils wrapt
  tokamax==0.0.17 einshape qwix pydantic pydantic-core annotated-types typing-inspection
  typing-extensions
  # The peer for benchmarks/compare_transfusion_pytorch.py (benchmark-only, never imported by
  # tfx_jax): transfusion-pytorch and what its wheels' Requires-Dist name beyond what the GPU
  # machine's torch 2.11 brings (sympy, numpy, scipy are already there). Not torch itself.
  transfusion-pytorch==0.20.0 axial-positional-embedding==0.3.12 beartype==0.23.1 einops==0.8.2
  einx==0.4.3 ema-pytorch==0.8.3 frozendict==2.5.1 jaxtyping==0.3.11 wadler-lindig==0.1.8
  loguru==0.7.3 rotary-embedding-torch==0.9.1 torch-einops-utils==0.2.0 torchdiffeq==0.2.5
  tqdm==4.70.1
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
# Pure-Python packages published only as source: build their wheels here.
"$PY" -m pip wheel -q --no-deps -w "$DEST" promise
# tokamax imports xprof's profiler API at import time; a stub module is enough for kernels.
STUB=$(mktemp -d)
mkdir -p "$STUB/xprof"
echo '"""Stub: tokamax imports xprof only for its profiling helpers."""' >"$STUB/xprof/__init__.py"
( cd "$STUB" && "$PY" - <<'PY'
import zipfile
with zipfile.ZipFile("xprof_stub-0.0.0-py3-none-any.whl", "w") as z:
    z.write("xprof/__init__.py")
    z.writestr("xprof_stub-0.0.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: xprof-stub\nVersion: 0.0.0\n")
    z.writestr("xprof_stub-0.0.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr("xprof_stub-0.0.0.dist-info/RECORD", "")
PY
)
cp "$STUB/xprof_stub-0.0.0-py3-none-any.whl" "$DEST/"
du -sh "$DEST"
