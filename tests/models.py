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
