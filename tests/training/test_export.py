"""Export: the default run's accuracy, Keras-vs-ONNX parity, metadata and the repository layout."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from convserve_protocol.model_card import ModelCard
from convserve_training.export import ParityError, check_parity, onnx_probabilities


def test_default_run_reaches_the_accuracy_target(default_training):
    # 97.5% on the held-out digits is the bar; training time is reported, not asserted.
    assert default_training.metrics["test_accuracy"] >= 0.975
    assert default_training.metrics["test_images"] == 360
    assert default_training.metrics["train_seconds"] > 0


def test_exported_file_carries_everything_a_server_needs(default_training):
    model = onnx.load(str(default_training.model_path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["probabilities"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [28, 28, 3]
    card = ModelCard.from_metadata({prop.key: prop.value for prop in model.metadata_props})
    assert card.labels == tuple(str(d) for d in range(10))
    assert (card.preprocessing.height, card.preprocessing.width) == (28, 28)
    assert card.preprocessing.scale == pytest.approx(1 / 255)
    assert (card.model_name, card.model_version, card.dataset) == ("digits", "1", "sklearn-digits")
    assert card.trained_at.startswith("20")
    assert card.metrics["test_accuracy"] == default_training.metrics["test_accuracy"]


def test_repository_layout_and_report(default_training):
    version_dir = default_training.model_path.parent
    assert default_training.model_path.name == "model.onnx" and version_dir.name == "1"
    assert version_dir.parent.name == "digits"
    report = version_dir / "report"
    assert {p.name for p in report.iterdir()} == {"training_curves.png", "confusion_matrix.png", "metrics.json"}
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["test_accuracy"] == default_training.metrics["test_accuracy"]
    assert (report / "training_curves.png").read_bytes().startswith(b"\x89PNG")
    assert not [p for p in version_dir.parent.iterdir() if p.name.startswith(".")], "no staging folder left"


def test_parity_check_passes_on_the_real_export_and_fails_when_the_files_differ(default_training):
    model_bytes = default_training.model_path.read_bytes()
    images = np.random.default_rng(3).random((16, 28, 28, 3), dtype=np.float32)
    expected = onnx_probabilities(model_bytes, images)
    assert check_parity(expected, model_bytes, images) <= 1e-4

    tampered = onnx.load_from_string(model_bytes)
    weights = next(init for init in tampered.graph.initializer if numpy_helper.to_array(init).ndim == 2)
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * 1.5, weights.name))
    with pytest.raises(ParityError, match="differ by"):
        check_parity(expected, tampered.SerializeToString(), images)


def test_onnx_runtime_reproduces_the_reported_accuracy(default_training):
    from convserve_protocol.preprocessing_spec import PreprocessingSpec
    from convserve_training.data import load_digits_dataset, split_dataset

    splits = split_dataset(load_digits_dataset(PreprocessingSpec(28, 28)), 0.1, 0.2, seed=42)
    session = ort.InferenceSession(str(default_training.model_path), providers=["CPUExecutionProvider"])
    predictions = session.run(None, {"image": splits.test.images})[0].argmax(axis=1)
    accuracy = float((predictions == splits.test.targets).mean())
    assert accuracy == pytest.approx(default_training.metrics["test_accuracy"], abs=1e-6)


def test_the_default_run_records_eight_held_out_images_of_eight_classes_as_golden_vectors(default_training):
    from convserve_protocol.golden import GOLDEN_KEY
    from convserve_client.preprocessing import PreprocessingSpec
    from convserve_training.data import load_digits_dataset, split_dataset

    model = onnx.load(str(default_training.model_path))
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    golden = ModelCard.from_metadata(metadata).golden
    assert golden is not None and golden.count == 8 and golden.tolerance == 1e-4
    assert golden.inputs.dtype == np.float32 and golden.inputs.shape == (8, 28, 28, 3)
    assert 1024 < len(metadata[GOLDEN_KEY]) < 64 * 1024

    test = split_dataset(load_digits_dataset(PreprocessingSpec(28, 28)), 0.1, 0.2, seed=42).test
    rows = [next(i for i, image in enumerate(test.images) if np.array_equal(image, golden_input))
            for golden_input in golden.inputs]  # StopIteration: not a held-out test image
    assert len(set(test.targets[rows].tolist())) == 8, "one image of each of eight classes"
    assert golden.worst_difference(onnx_probabilities(default_training.model_path.read_bytes(), golden.inputs)) <= 1e-4
