"""``convserve-golden``: golden vectors added to an existing ONNX file make the server verify it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc.aio
import numpy as np
import onnx
import pytest
from PIL import Image

from convserve_protocol.model_card import ModelCard
from convserve_client.preprocessing import preprocess_batch
from convserve_protocol.protos import classifier_pb2, classifier_pb2_grpc
from convserve_training.golden import cpu_probabilities, select_covering
from tests.models import tiny_model, with_one_weight_changed, write_version


def golden_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convserve_training.golden", *args],
                          capture_output=True, text=True, timeout=120)


def card_of(path: Path) -> ModelCard:
    return ModelCard.from_metadata({prop.key: prop.value for prop in onnx.load(str(path)).metadata_props})


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    """Twelve real PNG and JPEG files of several sizes, one in a sub-folder."""
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(12):
        pixels = rng.integers(0, 256, size=(int(rng.integers(8, 40)), int(rng.integers(8, 40)), 3), dtype=np.uint8)
        target = folder / "more" if i == 11 else folder
        Image.fromarray(pixels).save(target / f"image{i}.{'png' if i % 2 else 'jpg'}")
    (folder / "notes.txt").write_text("not an image, and not read")
    return folder


def test_select_covering_takes_every_class_before_a_second_of_any():
    classes = np.array([3, 3, 3, 1, 1, 0, 2, 3])
    chosen = select_covering(classes, 5)
    assert sorted(set(classes[chosen].tolist())) == [0, 1, 2, 3]
    assert len(chosen) == 5 and list(chosen) == sorted(chosen)
    assert list(select_covering(classes, 50)) == list(range(8))


def test_the_command_adds_vectors_in_place_chosen_from_the_images_with_the_files_own_probabilities(
    tmp_path, images_dir
):
    repository = tmp_path / "models"
    path = write_version(repository, "tiny", 1)
    assert card_of(path).golden is None

    done = golden_command(str(path), str(images_dir), "--count", "6", "--tolerance", "5e-5")
    assert done.returncode == 0, done.stderr
    assert "wrote 6 golden vectors" in done.stdout
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"], "no temporary file left beside it"

    card = card_of(path)
    assert card.golden is not None and card.golden.count == 6 and card.golden.tolerance == 5e-5
    files = sorted(p for p in images_dir.rglob("*") if p.suffix in (".png", ".jpg"))
    every_input = preprocess_batch(files, card.preprocessing)
    assert all(any(np.array_equal(row, candidate) for candidate in every_input) for row in card.golden.inputs)
    model_bytes = path.read_bytes()
    assert card.golden.worst_difference(cpu_probabilities(model_bytes, card, card.golden.inputs)) == 0.0


async def test_a_tiny_model_given_golden_vectors_by_the_command_is_served_verified(tmp_path, images_dir, start_server):
    repository = tmp_path / "models"
    path = write_version(repository, "tiny", 1)
    assert golden_command(str(path), str(images_dir)).returncode == 0
    server = await start_server(repository)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        info = await classifier_pb2_grpc.ClassifierStub(channel).GetModelInfo(classifier_pb2.GetModelInfoRequest())
    assert info.verified is True and info.verification_worst_difference <= 1e-4


def test_output_writes_a_new_file_and_leaves_the_original_alone(tmp_path, images_dir):
    original = tmp_path / "model.onnx"
    original.write_bytes(tiny_model().SerializeToString())
    before = original.read_bytes()
    done = golden_command(str(original), str(images_dir), "--output", str(tmp_path / "golden.onnx"))
    assert done.returncode == 0, done.stderr
    assert original.read_bytes() == before
    assert card_of(tmp_path / "golden.onnx").golden is not None


def test_running_it_again_replaces_the_vectors_for_a_changed_model(tmp_path, images_dir):
    path = tmp_path / "model.onnx"
    path.write_bytes(tiny_model().SerializeToString())
    assert golden_command(str(path), str(images_dir)).returncode == 0
    first = card_of(path).golden
    path.write_bytes(with_one_weight_changed(onnx.load(str(path))).SerializeToString())
    assert golden_command(str(path), str(images_dir)).returncode == 0
    second = card_of(path).golden
    assert first is not None and second is not None and second != first
    assert [p.key for p in onnx.load(str(path)).metadata_props].count("convserve.golden") == 1


@pytest.mark.parametrize("setup, message", [
    (lambda tmp, images: (tmp / "missing.onnx", images), "no such model file"),
    (lambda tmp, images: (write_bytes(tmp / "junk.onnx", b"junk"), images), "not a readable ONNX model"),
    (lambda tmp, images: (write_bytes(tmp / "plain.onnx", plain_model()), images), "no usable convserve model card"),
    (lambda tmp, images: (write_bytes(tmp / "m.onnx", tiny_model().SerializeToString()), tmp / "nowhere"),
     "no such directory"),
    (lambda tmp, images: (write_bytes(tmp / "m.onnx", tiny_model().SerializeToString()), empty_dir(tmp)),
     "no JPEG or PNG images"),
])
def test_bad_input_is_one_error_line_and_a_non_zero_exit(tmp_path, images_dir, setup, message):
    model, images = setup(tmp_path, images_dir)
    done = golden_command(str(model), str(images))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convserve-golden: error:") and message in lines[0], done.stderr


def test_the_command_does_not_need_tensorflow():
    probe = "import sys, convserve_training.golden; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def empty_dir(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def plain_model() -> bytes:
    model = tiny_model()
    del model.metadata_props[:]
    return model.SerializeToString()
