# convserve: the README's commands.  `make serve` and `make test` work on a fresh machine with
# Python 3.11 and pip: they create .venv and install what they need first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODELS ?= models
PORT ?= 8500

# ONNX Runtime's GPU build (the `gpu` extra: onnxruntime-gpu with NVIDIA's CUDA and cuDNN wheels) where nvidia-smi is
# on PATH, else its CPU build; GPU=1 or GPU=0 decides instead. scripts/onnxruntime-build.sh says which, and why.
GPU ?=
ORT_CHOICE := $(shell GPU='$(GPU)' $(SHELL) scripts/onnxruntime-build.sh 2>/dev/null)
ORT_BUILD := $(firstword $(ORT_CHOICE))
ifeq ($(filter cpu gpu,$(ORT_BUILD)),)
$(error GPU must be 0, 1 or unset, not '$(GPU)')
endif
# One stamp per build, so that changing GPU installs again.
STAMP := $(VENV)/.installed-$(ORT_BUILD)

.PHONY: install train serve test soak bench proto clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# onnxruntime and onnxruntime-gpu both install the `onnxruntime` module, in the same files: never both at once. The
# server and training extras bring the CPU build; for the GPU build it is removed (with any earlier GPU build whose
# files it overwrote) and the `gpu` extra installs onnxruntime-gpu into a clean folder. For the CPU build, a GPU build
# left from before goes first, so that onnxruntime is installed afresh rather than found "already satisfied".
$(STAMP): $(BIN)/python pyproject.toml client/pyproject.toml
	rm -f $(VENV)/.installed-*
ifeq ($(ORT_BUILD),gpu)
	$(BIN)/pip install --quiet -e ./client -e ".[dev]"
	$(BIN)/pip uninstall --quiet --quiet --yes onnxruntime onnxruntime-gpu
	$(BIN)/pip install --quiet -e ".[gpu]"
else
	$(BIN)/pip uninstall --quiet --quiet --yes onnxruntime-gpu onnxruntime
	$(BIN)/pip install --quiet -e ./client -e ".[dev]"
endif
	touch $(STAMP)

## install: create .venv and install the client, server, training and test dependencies (GPU=0|1: see above)
install: $(STAMP)
	@echo "ONNX Runtime: $(ORT_CHOICE)"

## train: train the default model into $(MODELS)/ unless it is there (a new version: make train FORCE=1)
train: install
	$(BIN)/convserve-train --model-repository $(MODELS) $(if $(FORCE),,--skip-if-present)

## serve: train if needed, then serve $(MODELS)/ on port $(PORT)
serve: train
	$(BIN)/convserve-serve --model-repository $(MODELS) --port $(PORT)

## test: the whole test suite (the soak test is left to `make soak`)
test: install
	$(BIN)/python -m pytest -m "not soak"

## soak: the long soak test
soak: install
	$(BIN)/python -m pytest -m soak -v -s

## bench: benchmark the server against its ceilings; writes bench-results/
bench: train
	$(BIN)/convserve-bench --model-repository $(MODELS) --output bench-results

## proto: regenerate the Python code in client/convserve_client/protos from proto/
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto \
		--python_out=client/convserve_client/protos --grpc_python_out=client/convserve_client/protos \
		--pyi_out=client/convserve_client/protos proto/grpc_predict_v2.proto proto/classifier.proto
	sed -i 's/^import \(\w*_pb2\) as/from . import \1 as/' client/convserve_client/protos/*_pb2_grpc.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis bench-results
