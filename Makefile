# Two commands: `make serve` and `make test`. Everything else is a step they run.
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
# pip prints a warning per package for this machine's local index mirrors; keep the log readable
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# KServe's SDK (tests/test_kserve_sdk.py) in a venv of its own: its pins clash with the project's
KSERVE_VENV  := .venv-kserve
KSERVE_STAMP := $(KSERVE_VENV)/.installed

.PHONY: setup serve test lint models bench bench-triton bench-torchserve bench-detect bench-int8 lambda clean

setup: $(STAMP) $(KSERVE_STAMP) models
	@# the browser tests (tests/test_ui.py) drive Debian's headless Chromium; we run as root
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@# tests/test_prometheus.py runs Debian's Prometheus and promtool (each test its own server, on a free
	@# loopback port); the package's own service is stopped where an init system started it
	@command -v prometheus >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
		&& { systemctl disable --now prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true; })

# Pinned dependencies; torch 2.13.0 resolves to the machine's local CPU wheel (never CUDA).
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | { $(QUIET_PIP); }
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt 2>&1 | { $(QUIET_PIP); }
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | { $(QUIET_PIP); }
	touch $(STAMP)

# kserve 0.21.0 pins protobuf<7 and psutil<6 where the project needs protobuf 7 (TensorFlow 2.21,
# tritonclient's gRPC): requirements-kserve.txt pins what it resolves to; no torch in it.
$(KSERVE_STAMP): requirements-kserve.txt
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install -q --disable-pip-version-check -r requirements-kserve.txt 2>&1 | { $(QUIET_PIP); }
	touch $(KSERVE_STAMP)

# Idempotent: builds only the model artifacts that are missing.
models: $(STAMP)
	$(BIN)/gateway models build

serve: setup
	$(BIN)/gateway serve --config gateway.yaml --host 127.0.0.1 --port 8000

test: setup lint
	$(BIN)/python -m pytest -q

# ruff over the code and tests, mypy over the package (configured in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check gateway tests benchmarks tools torchserve
	$(BIN)/mypy

# Benchmarks: presets of `gateway bench` (each route through a gateway it starts, beside direct
# baselines, one run; JSON, CSV and a chart in bench_results/) and side-by-side scripts.
bench: setup
	$(BIN)/gateway bench --model efficientnet_lite0 --routes embedded --concurrency 1,4,8 --out bench_results/embedded
	$(BIN)/python benchmarks/preprocess_bench.py

bench-triton: setup
	$(BIN)/gateway backends up triton
	$(BIN)/gateway bench --model efficientnet_lite0 --routes triton,triton-tf --concurrency 1,4,8 --out bench_results/triton

bench-torchserve: setup
	$(BIN)/gateway backends up torchserve
	$(BIN)/gateway bench --model efficientnet_lite0 --routes torchserve --concurrency 1,4,8 --out bench_results/torchserve

bench-detect: setup
	$(BIN)/gateway bench --model yolox_nano --routes embedded --concurrency 1,4 --out bench_results/detect

# The same job on the servers a user would pick instead (Flask + gunicorn, FastAPI + uvicorn, LitServe,
# BentoML, Ray Serve, KServe, MLServer), each in its own venv under run/peers/ (created on first use
# from benchmarks/peers/requirements-*.txt, no torch), beside the gateway; two interleaved rounds.
bench-peers: setup
	$(BIN)/python benchmarks/peers_bench.py

# FP32 and int8 efficientnet_lite0 through the gateway, in the same run (README "int8 models")
bench-int8: setup
	$(BIN)/gateway bench --model efficientnet_lite0 --routes embedded,embedded-int8 --concurrency 1,4,8 --out bench_results/int8

# AWS Lambda: build/lambda/gateway-lambda.zip and the container image's build context.
lambda: setup
	$(BIN)/gateway package lambda

clean:
	rm -rf run onnx artifacts.json model_repository/*/1 torchserve/model_store tfserving/models

# Holding traffic (issue 21): a stand-in engine (benchmarks/standin_engine.py) behind the gateway
# at 64/256 clients and 1,000 held connections; 4x overload on the embedded route; slow uploads
# beside normal clients. Each starts `gateway serve` as `make serve` does; JSON in bench_results/.
.PHONY: bench-concurrency bench-overload bench-slow-clients
bench-concurrency: setup
	$(BIN)/python benchmarks/concurrency_bench.py

bench-overload: setup
	$(BIN)/python benchmarks/overload_bench.py

bench-slow-clients: setup
	$(BIN)/python benchmarks/slow_clients_bench.py

# Traces (issue 25): the embedded classify path through `gateway serve` with tracing off and on
# (OTLP to a local receiver), same run; p50, img/s, CPU per request (README "Traces").
.PHONY: bench-tracing
bench-tracing: setup
	$(BIN)/python benchmarks/tracing_bench.py
