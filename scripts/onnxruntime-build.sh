#!/bin/sh
# Which ONNX Runtime build `make install` installs, on one line: `gpu` or `cpu`, then why.
# GPU=1 or GPU=0 decides; unset or empty, the GPU build exactly when nvidia-smi is on PATH (an NVIDIA driver is).
# Where onnxruntime-gpu has no wheel (macOS, Linux aarch64) the gpu extra's markers install the CPU build anyway.
case "${GPU-}" in
    1) echo "gpu (GPU=1)" ;;
    0) echo "cpu (GPU=0)" ;;
    "")
        if command -v nvidia-smi >/dev/null 2>&1; then
            echo "gpu (nvidia-smi found; GPU=0 for the CPU build)"
        else
            echo "cpu (no nvidia-smi; GPU=1 for the GPU build)"
        fi ;;
    *) echo "GPU must be 0, 1 or unset, not '$GPU'" >&2; exit 2 ;;
esac
