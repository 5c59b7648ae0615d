"""A model exported with a fixed batch dimension is refused at load with one line that says how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from convserve_server.errors import StartupError
from convserve_server.runtime import DeviceRequest, OnnxModel
from tests.models import tiny_model


def fixed_batch_model(batch: int):
    """The tiny model with its input's and output's first dimension fixed at ``batch``."""
    model = tiny_model()
    for tensor in (model.graph.input[0], model.graph.output[0]):
        tensor.type.tensor_type.shape.dim[0].dim_value = batch
    return model


def test_a_fixed_batch_dimension_is_a_one_line_load_error(tmp_path: Path):
    path = tmp_path / "model.onnx"
    path.write_bytes(fixed_batch_model(1).SerializeToString())
    with pytest.raises(StartupError) as refused:
        OnnxModel.load(path, DeviceRequest.parse("cpu"))
    message = str(refused.value)
    assert "fixed batch dimension of 1" in message and "dynamic first axis" in message
    assert "\n" not in message


def test_a_dynamic_batch_dimension_loads(tmp_path: Path):
    path = tmp_path / "model.onnx"
    path.write_bytes(tiny_model().SerializeToString())
    assert OnnxModel.load(path, DeviceRequest.parse("cpu")).input_shape == (8, 8, 3)
