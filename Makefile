# Two commands set up everything on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the local virtualenv .venv; nothing else is assumed.

SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
# Prefer Python 3.12 (the jax line the GPU machines run); fall back to any python3 >= 3.11.
PYTHON ?= $(shell for p in python3.12 $$(ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null) python3.13 python3; do \
            $$p -c 'import sys; assert sys.version_info >= (3, 11)' >/dev/null 2>&1 && echo $$p && break; done)
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
WORKDIR ?= runs/demo

.PHONY: venv demo test lint format clean

$(BIN)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "No Python >= 3.11 found: install one, or run 'make PYTHON=/path/to/python3.12 ...'"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m tfx_jax demo --workdir $(WORKDIR)

test: venv .venv-hf tools
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

# shellcheck, for tests/test_launch.py: installed when missing and apt-get is there (CI runs as
# root); best effort, never fatal: without it those checks skip and say why.
.PHONY: tools
tools:
	@command -v shellcheck >/dev/null || ! command -v apt-get >/dev/null || \
	  apt-get install -y -qq shellcheck >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq shellcheck >/dev/null 2>&1; } || \
	  echo "shellcheck not installed (apt-get failed): tests/test_launch.py skips its shellcheck test"

# PyTorch + transformers, only for tests/test_export.py (it runs tests/hf_logits.py here to load
# the Hugging Face export). A separate Python 3.11 venv: the torch 2.13.0 CPU wheel on these
# machines is cp311-only, and torch in .venv (3.12) would pull GBs of CUDA packages. The exact
# torch pin is what keeps pip on that wheel; transformers < 5 keeps the slow SentencePiece
# LlamaTokenizer; protobuf lets AutoTokenizer convert tokenizer.model to the fast tokenizer.
HF_VENV := .venv-hf
HF_PYTHON ?= $(shell for p in python3.11 python3; do \
            $$p -c 'import sys; assert sys.version_info[:2] == (3, 11)' >/dev/null 2>&1 && echo $$p && break; done)
HF_PACKAGES := 'torch==2.13.0' 'transformers>=4.45,<5' 'safetensors>=0.4' 'sentencepiece>=0.2,<0.3' \
               'numpy>=1.26,<3' 'protobuf>=4'

.PHONY: .venv-hf
.venv-hf: $(HF_VENV)/.installed

$(HF_VENV)/.installed: Makefile
	@test -n "$(HF_PYTHON)" || { echo "No Python 3.11 found for $(HF_VENV) (torch 2.13.0 CPU is cp311): run 'make HF_PYTHON=/path/to/python3.11 .venv-hf'"; exit 1; }
	@test -x $(HF_VENV)/bin/python || $(HF_PYTHON) -m venv $(HF_VENV)
	$(HF_VENV)/bin/pip install -q $(HF_PACKAGES)
	@touch $@

lint: venv
	$(BIN)/ruff format --check tfx_jax tests experiments benchmarks
	$(BIN)/ruff check tfx_jax tests experiments benchmarks

format: venv
	$(BIN)/ruff format tfx_jax tests experiments benchmarks
	$(BIN)/ruff check --fix tfx_jax tests experiments benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
