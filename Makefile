# Two commands: `make serve` and `make test`. Everything else is a step they run.
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
# pip prints a warning per package for this machine's local index mirrors; keep the log readable
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup serve test models bench bench-triton bench-torchserve lambda clean

setup: $(STAMP) models

# Pinned dependencies; torch 2.13.0 resolves to the machine's local CPU wheel (never CUDA).
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | { $(QUIET_PIP); }
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt 2>&1 | { $(QUIET_PIP); }
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | { $(QUIET_PIP); }
	touch $(STAMP)

# Idempotent: builds only the model artifacts that are missing.
models: $(STAMP)
	$(BIN)/gateway models build

serve: setup
	$(BIN)/gateway serve --config gateway.yaml --host 127.0.0.1 --port 8000

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/embedded_bench.py

bench-triton: setup
	$(BIN)/python benchmarks/triton_bench.py

bench-torchserve: setup
	$(BIN)/python benchmarks/torchserve_bench.py

# AWS Lambda: build/lambda/gateway-lambda.zip and the container image's build context.
lambda: setup
	$(BIN)/gateway package lambda

clean:
	rm -rf run onnx artifacts.json model_repository/*/1 torchserve/model_store tfserving/models
