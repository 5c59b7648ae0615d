"""``--crop center`` from training to ``convserve-classify``, and model files from before it, served unchanged.

The reference is Keras itself: ``load_img`` → ``CenterCrop`` → ``Rescaling`` → the exported ONNX model
in ONNX Runtime.  The served probabilities must equal it, so training, server and client all followed
the crop mode the model card recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras  # TensorFlow's Keras: the reference, in the test only
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from convserve_client import AsyncClient
from convserve_protocol.model_card import ModelCard
from convserve_client.preprocessing import PreprocessingSpec, preprocess
from tests.models import tiny_model, write_version
from convserve_bench.processes import ServerProcess

HEIGHT, WIDTH = 32, 48
PROBABILITY_TOLERANCE = 1e-5
IMAGES_PER_CLASS = 10


def make_photo_dataset(root: Path) -> None:
    """Two class folders, "china" and "flower": random crops and mirror images of the two sample photos."""
    rng = np.random.default_rng(7)
    samples = load_sample_images()
    for name, photo in zip(("china", "flower"), samples.images):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            height, width = int(rng.integers(120, 300)), int(rng.integers(160, 400))
            top, left = int(rng.integers(0, 427 - height)), int(rng.integers(0, 640 - width))
            crop = photo[top : top + height, left : left + width]
            if i % 2:
                crop = crop[:, ::-1]
            Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{name}{i}.{'png' if i % 3 else 'jpg'}")


def query_images(folder: Path) -> list[Path]:
    """Files to classify: both whole photos, and a thumbnail smaller than the crop window (Keras resizes it)."""
    folder.mkdir()
    paths = []
    for name, photo in zip(("china", "flower"), load_sample_images().images):
        paths.append(folder / f"{name}.png")
        Image.fromarray(photo).save(paths[-1])
    paths.append(folder / "thumbnail.png")
    Image.fromarray(load_sample_images().images[1]).resize((40, 27), Image.BILINEAR).save(paths[-1])
    return paths


def keras_then_onnx(model_path: Path, paths: list[Path], layers: list[keras.layers.Layer]) -> np.ndarray:
    """Each file read by Keras, put through ``layers``, then through the ONNX model in ONNX Runtime."""
    pipeline = keras.Sequential(layers)
    batch = np.concatenate([
        np.asarray(pipeline(keras.utils.img_to_array(keras.utils.load_img(path))[None])) for path in paths
    ])
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def classify_with_the_cli(address: str, model: str, paths: list[Path], labels: tuple[str, ...]) -> np.ndarray:
    """``convserve-classify --json`` as a real process; one row of probabilities per image, in label order."""
    done = subprocess.run(
        [sys.executable, "-m", "convserve_client.cli", *map(str, paths), "--server", address, "--model", model,
         "--top-k", str(len(labels)), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert [r["image"] for r in results] == list(map(str, paths))
    return np.array([[{p["label"]: p["score"] for p in r["top_k"]}[label] for label in labels] for r in results])


def test_a_model_trained_with_center_crop_classifies_as_keras_layers_then_onnx(tmp_path):
    from convserve_training.cli import main  # loads TensorFlow only when training starts

    data_dir = tmp_path / "photos"
    make_photo_dataset(data_dir)
    repository = tmp_path / "repo"
    assert main(["--data-dir", str(data_dir), "--model-repository", str(repository), "--crop", "center",
                 "--height", str(HEIGHT), "--width", str(WIDTH), "--epochs", "2", "--batch-size", "8",
                 "--quiet"]) == 0
    model_path = repository / "photos" / "1" / "model.onnx"
    card = ModelCard.from_metadata({p.key: p.value for p in onnx.load(str(model_path)).metadata_props})
    assert card.preprocessing == PreprocessingSpec(HEIGHT, WIDTH, crop="center")
    assert card.labels == ("china", "flower")

    paths = query_images(tmp_path / "queries")
    expected = keras_then_onnx(
        model_path, paths, [keras.layers.CenterCrop(HEIGHT, WIDTH), keras.layers.Rescaling(1.0 / 255)])
    with ServerProcess(repository) as server:
        served = classify_with_the_cli(server.address, "photos", paths, card.labels)
    assert served.shape == expected.shape == (3, 2)
    assert np.max(np.abs(served - expected)) <= PROBABILITY_TOLERANCE


SPEC_V1_8X8 = (
    '{"channels": 3, "crop": "center_to_aspect_ratio", "height": 8, "interpolation": "bilinear", '
    '"offset": 0.0, "scale": 0.00392156862745098, "spec_version": 1, "width": 8}'
)
"""The preprocessing metadata of an 8×8 model exported before the ``center`` mode, as it was written."""


@pytest.fixture
def old_model_repository(tmp_path: Path) -> Path:
    """A repository holding one model file whose metadata is byte for byte the old format."""
    model = tiny_model(labels=("ant", "bee", "cat", "dog"), name="old")
    for prop in model.metadata_props:
        if prop.key == "convserve.preprocessing":
            prop.value = SPEC_V1_8X8
    repository = tmp_path / "models"
    write_version(repository, "old", 1, model)
    return repository


async def test_an_old_model_file_loads_and_classifies_unchanged(old_model_repository, start_server, tmp_path):
    paths = query_images(tmp_path / "queries")
    server = await start_server(old_model_repository)
    async with AsyncClient(f"127.0.0.1:{server.port}", model_name="old") as client:
        info = await client.model_info()
        results = await client.classify(paths, include_probabilities=True)
    served = np.array([result.probabilities for result in results])
    assert info.preprocessing == PreprocessingSpec(8, 8) and info.preprocessing.to_json() == SPEC_V1_8X8

    model_path = old_model_repository / "old" / "1" / "model.onnx"
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"image": np.stack([preprocess(path, PreprocessingSpec(8, 8)) for path in paths])})[0]
    np.testing.assert_allclose(served, ours, rtol=0, atol=1e-6)
    keras_reference = keras_then_onnx(
        model_path, paths, [keras.layers.Resizing(8, 8, crop_to_aspect_ratio=True), keras.layers.Rescaling(1.0 / 255)])
    assert np.max(np.abs(served - keras_reference)) <= PROBABILITY_TOLERANCE
