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

test: venv
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

lint: venv
	$(BIN)/ruff format --check tfx_jax tests experiments benchmarks
	$(BIN)/ruff check tfx_jax tests experiments benchmarks

format: venv
	$(BIN)/ruff format tfx_jax tests experiments benchmarks
	$(BIN)/ruff check --fix tfx_jax tests experiments benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
