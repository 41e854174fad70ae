# fsad developer commands. `make help` lists them.
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: help install test lint demo bench gpu-check

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

install: ## Create .venv with pip and install fsad with its dev extras (editable)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'

test: ## Run the whole test suite (fails if no test is collected)
	$(PY) -m pytest

lint: ## Check style and formatting with ruff
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: ## Offline demo: memory-bank method, tiny random backbone, procedural data
	$(VENV)/bin/fsad test -c configs/demo.yaml

bench: ## Run every benchmark script; each prints one ratio line last
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

gpu-check: ## The prepared GPU check (1-2 GPUs, <= 8 min, one line per figure); one line and a no-op without CUDA
	$(PY) benchmarks/gpu_check.py
