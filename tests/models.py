"""Small real ONNX models built by the tests themselves (no TensorFlow needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from convserve_protocol.model_card import ModelCard
from convserve_protocol.preprocessing_spec import PreprocessingSpec

TINY_LABELS = ("ant", "bee", "cat", "dog")


def tiny_model(
    labels: tuple[str, ...] = TINY_LABELS, height: int = 8, width: int = 8, seed: int = 0,
    name: str = "tiny", version: str = "1", hidden_layers: int = 0, hidden_width: int = 1024,
    crop: str = "center_to_aspect_ratio",
) -> onnx.ModelProto:
    """Flatten → MatMul → Add → Softmax on (N, H, W, 3) images, with a full model card.

    ``hidden_layers`` square MatMul+Tanh layers of ``hidden_width`` make it as slow as a test needs;
    ``crop`` is the card's crop mode.
    """
    rng = np.random.default_rng(seed)
    features = height * width * 3
    nodes = [helper.make_node("Reshape", ["image", "flat_shape"], ["flat"])]
    hidden_weights = []
    last, width_in = "flat", features
    for layer in range(hidden_layers):
        hidden_weights.append(numpy_helper.from_array(
            (rng.normal(size=(width_in, hidden_width)) / np.sqrt(width_in)).astype(np.float32), f"hidden{layer}"))
        nodes.append(helper.make_node("MatMul", [last, f"hidden{layer}"], [f"hidden{layer}_raw"]))
        nodes.append(helper.make_node("Tanh", [f"hidden{layer}_raw"], [f"hidden{layer}_out"]))
        last, width_in = f"hidden{layer}_out", hidden_width
    weights = rng.normal(size=(width_in, len(labels))).astype(np.float32)
    bias = rng.normal(size=(len(labels),)).astype(np.float32)
    graph = helper.make_graph(
        [
            *nodes,
            helper.make_node("MatMul", [last, "weights"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", height, width, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(labels)])],
        initializer=[
            numpy_helper.from_array(np.array([-1, features], dtype=np.int64), "flat_shape"),
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
            *hidden_weights,
        ],
    )
    return _model_with_card(graph, labels, height, width, name, version, crop)


def conv_model(
    labels: tuple[str, ...] = TINY_LABELS, height: int = 32, width: int = 32, filters: int = 16, seed: int = 0,
    name: str = "conv", version: str = "1",
) -> onnx.ModelProto:
    """A small CNN on (N, H, W, 3) images, with a full model card: Transpose to NCHW → Conv 3×3 → Relu →
    GlobalAveragePool → Flatten → Gemm → Softmax.  The convolution is what makes a CUDA run need cuDNN."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["nchw", "kernel", "kernel_bias"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["features"]),
            helper.make_node("Gemm", ["features", "weights", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", height, width, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(labels)])],
        initializer=[
            numpy_helper.from_array((rng.normal(size=(filters, 3, 3, 3)) / np.sqrt(27)).astype(np.float32), "kernel"),
            numpy_helper.from_array(rng.normal(size=(filters,)).astype(np.float32), "kernel_bias"),
            numpy_helper.from_array(rng.normal(size=(filters, len(labels))).astype(np.float32), "weights"),
            numpy_helper.from_array(rng.normal(size=(len(labels),)).astype(np.float32), "bias"),
        ],
    )
    return _model_with_card(graph, labels, height, width, name, version)


def _model_with_card(
    graph: onnx.GraphProto, labels: tuple[str, ...], height: int, width: int, name: str, version: str,
    crop: str = "center_to_aspect_ratio",
) -> onnx.ModelProto:
    """The checked model of ``graph``, its model card in the metadata."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = ModelCard(
        model_name=name, model_version=version, labels=labels,
        preprocessing=PreprocessingSpec(height=height, width=width, crop=crop),
        trained_at="2026-01-01T00:00:00+00:00", dataset="synthetic", metrics={"test_accuracy": 0.5},
    )
    helper.set_model_props(model, card.to_metadata())
    onnx.checker.check_model(model)
    return model


def write_version(repository: Path, name: str, version: int, model: onnx.ModelProto | None = None, **kwargs: object) -> Path:
    """Write ``<repository>/<name>/<version>/model.onnx`` and return its path."""
    path = repository / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    proto = model if model is not None else tiny_model(name=name, version=str(version), **kwargs)  # type: ignore[arg-type]
    path.write_bytes(proto.SerializeToString())
    return path


def with_golden(model: onnx.ModelProto, seed: int = 0, count: int = 8, tolerance: float = 1e-4) -> onnx.ModelProto:
    """``model`` with golden vectors added by ``convserve-golden``'s library function, from random RGB images."""
    from convserve_training.golden import golden_vectors_for, with_golden_vectors

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8) for _ in range(2 * count)]
    return with_golden_vectors(model, golden_vectors_for(model, images, count, tolerance))


def with_one_weight_changed(model: onnx.ModelProto, delta: float = 1.0) -> onnx.ModelProto:
    """A copy of ``model`` (metadata and card untouched) whose first convolution or matrix weight has one element
    moved by ``delta``."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    candidates = [init for init in changed.graph.initializer
                  if init.data_type == TensorProto.FLOAT and len(init.dims) in (2, 4)]
    target = max(candidates, key=lambda init: len(init.dims))  # a 4-D convolution kernel wins over a matrix
    values = numpy_helper.to_array(target).copy()
    values.flat[0] += np.float32(delta)
    target.CopyFrom(numpy_helper.from_array(values, target.name))
    return changed
