# convserve: the README's commands.  `make serve` and `make test` work on a fresh machine with
# Python 3.11 and pip: they create .venv and install what they need first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODELS ?= models
PORT ?= 8500
HOST ?= 127.0.0.1

# ONNX Runtime's build, on one line: `gpu` or `cpu`, then why.  GPU=1 or GPU=0 decides; unset, the GPU build exactly
# when nvidia-smi is on PATH (an NVIDIA driver is).  Where onnxruntime-gpu has no wheel (macOS, Linux aarch64) the
# gpu extra's markers install the CPU build anyway.
GPU ?=
ORT_CHOICE := $(shell case "$(GPU)" in (1) echo "gpu (GPU=1)";; (0) echo "cpu (GPU=0)";; \
	("") if command -v nvidia-smi >/dev/null 2>&1; then echo "gpu (nvidia-smi found; GPU=0 for the CPU build)"; \
	     else echo "cpu (no nvidia-smi; GPU=1 for the GPU build)"; fi;; (*) echo invalid;; esac)
ORT_BUILD := $(firstword $(ORT_CHOICE))
ifeq ($(filter cpu gpu,$(ORT_BUILD)),)
$(error GPU must be 0, 1 or unset, not '$(GPU)')
endif
# Two install profiles, each with its stamp: serve (the contract, client, server and training: what `make serve` and
# `make train` need) and dev (serve plus the root distribution's dev extra: test, benchmark and proto tools).
SERVE_STAMP := $(VENV)/.installed-serve-$(ORT_BUILD)
DEV_STAMP := $(VENV)/.installed-dev-$(ORT_BUILD)

.PHONY: install install-serve train serve test perf-deps browser-deps soak bench proto docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

PARTS := proto client server training

# The two ONNX Runtime builds provide the same module: one is removed before the other is installed.  Every pip
# install that may pull in the CPU build (training and the dev extra depend on it) is followed by the GPU swap.
define GPU_SWAP
	$(BIN)/pip uninstall --quiet --quiet --yes onnxruntime onnxruntime-gpu
	$(BIN)/pip install --quiet -e "./server[gpu]"
endef

# The root distribution goes first: it once held the server and training too, and uninstalling that old version
# after theirs are installed would take their commands with it (the dev stamp installs it again).
$(SERVE_STAMP): $(BIN)/python $(foreach part,$(PARTS),$(part)/pyproject.toml)
	rm -f $(VENV)/.installed-*
	$(BIN)/pip uninstall --quiet --quiet --yes convserve
ifeq ($(ORT_BUILD),gpu)
	$(BIN)/pip install --quiet $(foreach part,$(PARTS),-e ./$(part))
	$(GPU_SWAP)
else
	$(BIN)/pip uninstall --quiet --quiet --yes onnxruntime-gpu onnxruntime
	$(BIN)/pip install --quiet $(foreach part,$(PARTS),-e ./$(part))
endif
	touch $(SERVE_STAMP)

$(DEV_STAMP): $(SERVE_STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev]"
ifeq ($(ORT_BUILD),gpu)
	$(GPU_SWAP)
endif
	touch $(DEV_STAMP)

## install-serve: create .venv and install what serving and training need (the serve profile, docs/installing.md)
install-serve: $(SERVE_STAMP)
	@echo "ONNX Runtime: $(ORT_CHOICE)"

## install: install-serve plus the test, benchmark and proto tools (the dev profile)
install: install-serve $(DEV_STAMP)

## train: train the default model into $(MODELS)/ unless it is there (a new version: make train FORCE=1)
train: install-serve
	$(BIN)/convserve-train --model-repository $(MODELS) $(if $(FORCE),,--skip-if-present)

## serve: train if needed, then serve $(MODELS)/ on port $(PORT) of this machine only (HOST=0.0.0.0: every interface;
## then set --auth-token or TLS, docs/deploying.md)
serve: train
	$(BIN)/convserve-serve --model-repository $(MODELS) --host $(HOST) --port $(PORT) --metrics-host $(HOST) --http-host $(HOST)

## test: the whole test suite (the soak test is left to `make soak`)
test: install perf-deps browser-deps
	$(BIN)/python -m pytest -m "not soak"

## perf-deps: Debian's libb64-0d, which perf_analyzer (in the tritonclient wheel) needs; installed where apt-get
## can as root, else its test skips and says so
perf-deps:
	@ldconfig -p | grep -q 'libb64\.so\.0d' || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null; } \
		|| echo "libb64-0d not installed: the perf_analyzer test will skip (apt-get install libb64-0d)"

## browser-deps: Debian's chromium and chromium-driver, for the test of the page at / (tests/server/http/test_page.py);
## installed where apt-get can as root, else that test skips and says so
browser-deps:
	@{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
		|| echo "chromium not installed: the page's browser test will skip (apt-get install chromium chromium-driver)"

## soak: the long soak test
soak: install
	$(BIN)/python -m pytest -m soak -v -s

## bench: benchmark the server against its references and ceilings (docs/benchmarking.md); writes bench-results/
## (several models: make bench MODEL=NAME)
bench: install train
	$(BIN)/convserve-bench --model-repository $(MODELS) --output bench-results $(if $(MODEL),--model $(MODEL))

GENERATED := proto/convserve_protocol/protos

## proto: regenerate the Python code in $(GENERATED) from proto/*.proto
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto \
		--python_out=$(GENERATED) --grpc_python_out=$(GENERATED) --pyi_out=$(GENERATED) \
		proto/grpc_predict_v2.proto proto/classifier.proto
	sed -i 's/^import \(\w*_pb2\) as/from . import \1 as/' $(GENERATED)/*_pb2_grpc.py

## docs: regenerate docs/configuration.md from the server's config class
docs: install-serve
	$(BIN)/python -m convserve_server.config_docs > docs/configuration.md

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis bench-results
