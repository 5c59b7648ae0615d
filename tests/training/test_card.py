"""``convserve-card`` makes an ONNX file from elsewhere servable: the card goes in, the server serves it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from convserve_protocol.model_card import ModelCard
from convserve_protocol.protos import classifier_pb2 as cpb
from convserve_protocol.protos import classifier_pb2_grpc as cpb_grpc
from tests.models import tiny_model


def foreign_model(height: int = 8, width: int = 8) -> onnx.ModelProto:
    """A model as another exporter writes it: other tensor names, no convserve metadata, a key of its own."""
    model = tiny_model(height=height, width=width)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {"producer.note": "kept"})
    for node in model.graph.node:
        node.input[:] = ["pixels" if name == "image" else name for name in node.input]
        node.output[:] = ["scores" if name == "probabilities" else name for name in node.output]
    model.graph.input[0].name = "pixels"
    model.graph.output[0].name = "scores"
    return model


def run_card(*args: str) -> subprocess.CompletedProcess[str]:
    """The command in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "convserve_training.card", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_card_reads_size_and_names_from_the_graph_and_keeps_other_metadata(tmp_path: Path) -> None:
    source = tmp_path / "foreign.onnx"
    onnx.save(foreign_model(height=8, width=12), source)
    result = run_card(source, "--name", "pets", "--labels", "ant, bee,cat,dog", "--crop", "center_to_aspect_ratio")
    assert result.returncode == 0, result.stderr
    metadata = {prop.key: prop.value for prop in onnx.load(source).metadata_props}
    card = ModelCard.from_metadata(metadata)
    assert (card.model_name, card.labels, card.input_name, card.output_name) == (
        "pets", ("ant", "bee", "cat", "dog"), "pixels", "scores")
    assert (card.preprocessing.height, card.preprocessing.width) == (8, 12)
    assert metadata["producer.note"] == "kept"


def test_labels_from_a_file_and_a_separate_output(tmp_path: Path) -> None:
    source, destination = tmp_path / "foreign.onnx", tmp_path / "with-card.onnx"
    onnx.save(foreign_model(), source)
    (tmp_path / "labels.txt").write_text("ant\nbee\n\ncat\ndog\n")
    result = run_card(source, "--name", "pets", "--labels", f"@{tmp_path / 'labels.txt'}", "-o", destination)
    assert result.returncode == 0, result.stderr
    assert ModelCard.from_metadata(
        {p.key: p.value for p in onnx.load(destination).metadata_props}).labels == ("ant", "bee", "cat", "dog")
    assert not {p.key for p in onnx.load(source).metadata_props} & {"convserve.labels"}  # source untouched


@pytest.mark.parametrize("args, message", [
    (("--labels", "a,b,c"), "output has 4 classes but 3 labels"),
    (("--labels", "a,b,c,a"), "labels must be unique"),
])
def test_bad_labels_are_a_one_line_error_and_leave_the_file_alone(tmp_path: Path, args, message) -> None:
    source = tmp_path / "foreign.onnx"
    onnx.save(foreign_model(), source)
    before = source.read_bytes()
    result = run_card(source, "--name", "pets", *args)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert source.read_bytes() == before


@pytest.mark.parametrize("tensor", ["input", "output"])
def test_a_fixed_batch_dimension_is_refused_with_a_one_line_error(tmp_path: Path, tensor: str) -> None:
    model = foreign_model()
    value_info = model.graph.input[0] if tensor == "input" else model.graph.output[0]
    value_info.type.tensor_type.shape.dim[0].dim_value = 1  # as exporters write it when given one example
    source = tmp_path / "fixed.onnx"
    onnx.save(model, source)
    before = source.read_bytes()
    result = run_card(source, "--name", "pets", "--labels", "a,b,c,d")
    assert result.returncode == 1 and result.stderr.startswith("convserve-card: error:")
    assert result.stderr.count("\n") == 1 and "fixed batch dimension of 1" in result.stderr
    assert source.read_bytes() == before


def test_a_file_that_is_not_onnx_is_a_one_line_error(tmp_path: Path) -> None:
    source = tmp_path / "notes.onnx"
    source.write_text("not a model")
    result = run_card(source, "--name", "pets", "--labels", "a,b")
    assert result.returncode == 1 and result.stderr.startswith("convserve-card: error:")
    assert result.stderr.count("\n") == 1


async def test_the_server_serves_a_carded_foreign_model(tmp_path: Path, start_server) -> None:
    repository = tmp_path / "models"
    path = repository / "pets" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(foreign_model(), path)
    assert run_card(path, "--name", "pets", "--labels", "ant,bee,cat,dog").returncode == 0
    server = await start_server(repository)
    images = np.random.default_rng(1).random((3, 8, 8, 3), dtype=np.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = await cpb_grpc.ClassifierStub(channel).Classify(cpb.ClassifyRequest(
            model_name="pets", images=images.tobytes(), shape=list(images.shape), top_k=4,
            include_probabilities=True))
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixels": images})[0]
    served = np.array([list(result.probabilities) for result in reply.results], dtype=np.float32)
    np.testing.assert_allclose(served, expected, atol=1e-6)
