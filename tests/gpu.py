"""Whether this machine can run the GPU tests: a real convolution on ONNX Runtime's CUDA execution provider."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import onnxruntime as ort

from convserve_server.errors import StartupError
from convserve_server.runtime import CUDA, DeviceRequest, OnnxModel
from tests.models import conv_model, write_version


@functools.cache
def cuda_unusable() -> str | None:
    """Why a convolution cannot run on CUDA here, or None where it can (listing the provider is not enough)."""
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build has no {CUDA}"
    with tempfile.TemporaryDirectory() as folder:
        path = write_version(Path(folder), "conv", 1, conv_model())
        try:
            OnnxModel.load(path, DeviceRequest("cuda"))  # also loads the pip-installed CUDA libraries, once
        except StartupError as exc:
            return f"CUDA unusable here: {exc}"
    return None
