"""The ``center`` crop mode against Keras's own CenterCrop and Rescaling layers, on the seed's photo files.

Keras reads each file with ``keras.utils.load_img``; convserve reads the same file with
:func:`preprocess`.  Where CenterCrop only slices, the two must agree bit for bit; where the
image is smaller than the window, CenterCrop resizes, and they must agree within
``RESIZE_TOLERANCE`` on the 0..255 scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras  # TensorFlow's Keras: a test dependency only, for the parity checks
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from convserve_client.preprocessing import PreprocessingSpec, preprocess
from convserve_protocol.preprocessing_spec import CROP_MODES

RESIZE_TOLERANCE = 1e-3
"""Largest |ours − Keras| on the 0..255 scale where Keras resizes: float32 rounding only."""

SPEC_V1_JSON = (
    '{"channels": 3, "crop": "center_to_aspect_ratio", "height": 28, "interpolation": "bilinear", '
    '"offset": 0.0, "scale": 0.00392156862745098, "spec_version": 1, "width": 28}'
)
"""A preprocessing spec exactly as model files exported before the ``center`` mode carry it."""


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """scikit-learn's two 427×640 sample photos, as a PNG and a JPEG file."""
    folder = tmp_path_factory.mktemp("photos")
    samples = load_sample_images()
    paths = [folder / "china.png", folder / "flower.jpg"]
    for path, image in zip(paths, samples.images):
        assert image.shape == (427, 640, 3)
        Image.fromarray(image).save(path)
    return paths


@pytest.fixture(scope="module")
def odd_width_file(photo_files: list[Path]) -> Path:
    """The first photo cut to 639 columns, so the width is odd too."""
    path = photo_files[0].with_name("china-639.png")
    Image.open(photo_files[0]).crop((0, 0, 639, 427)).save(path)
    return path


@pytest.fixture(scope="module")
def gray_file(photo_files: list[Path]) -> Path:
    """The first photo in 8-bit grayscale (Pillow mode "L")."""
    path = photo_files[0].with_name("china-gray.png")
    Image.open(photo_files[0]).convert("L").save(path)
    return path


def keras_pixels(path: Path, color_mode: str = "rgb") -> np.ndarray:
    """A file as Keras reads it: ``load_img`` then ``img_to_array`` (float32, 0..255), batched."""
    return keras.utils.img_to_array(keras.utils.load_img(path, color_mode=color_mode))[None]


def keras_center_crop(pixels: np.ndarray, height: int, width: int,
                      scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """Keras ``CenterCrop(height, width)`` then ``Rescaling(scale, offset)`` on one batched image."""
    model = keras.Sequential([keras.layers.CenterCrop(height, width), keras.layers.Rescaling(scale, offset)])
    return np.asarray(model(pixels))[0]


def test_seed_pipeline_center_crop_70x120_and_rescaling_is_bit_for_bit(photo_files):
    spec = PreprocessingSpec(70, 120, crop="center")
    for path in photo_files:
        expected = keras_center_crop(keras_pixels(path), 70, 120, scale=1.0 / 255)
        ours = preprocess(path, spec)
        assert ours.dtype == np.float32 and ours.shape == (70, 120, 3)
        np.testing.assert_array_equal(ours, expected)


def test_center_mode_differs_from_the_aspect_ratio_mode_on_a_photo(photo_files):
    # The whole point of the new mode: CenterCrop(70, 120) does not shrink the photo.
    center = preprocess(photo_files[0], PreprocessingSpec(70, 120, crop="center"))
    aspect = preprocess(photo_files[0], PreprocessingSpec(70, 120))
    assert np.max(np.abs(center - aspect)) > 0.1


def test_scale_and_offset_compose_with_the_center_crop(photo_files):
    spec = PreprocessingSpec(64, 64, crop="center", scale=1.0 / 127.5, offset=-1.0)
    for path in photo_files:
        expected = keras_center_crop(keras_pixels(path), 64, 64, scale=1.0 / 127.5, offset=-1.0)
        np.testing.assert_array_equal(preprocess(path, spec), expected)


@pytest.mark.parametrize(
    "size",
    [(69, 119), (69, 120), (70, 121), (1, 1), (426, 639), (427, 640), (427, 1), (2, 639)],
    ids=lambda size: f"{size[0]}x{size[1]}",
)
def test_odd_sized_crops_are_centred_as_keras_centres_them(photo_files, odd_width_file, size):
    # 427 rows (odd) and 640 or 639 columns: every parity of surplus occurs.
    spec = PreprocessingSpec(*size, crop="center", scale=1.0)
    for path in (*photo_files, odd_width_file):
        expected = keras_center_crop(keras_pixels(path), *size)
        np.testing.assert_array_equal(preprocess(path, spec), expected)


@pytest.mark.parametrize(
    "size",
    [(500, 700), (640, 427), (500, 120), (70, 800), (428, 640), (427, 641)],
    ids=lambda size: f"{size[0]}x{size[1]}",
)
def test_a_window_larger_than_the_image_resizes_as_keras_does(photo_files, size):
    spec = PreprocessingSpec(*size, crop="center", scale=1.0)
    for path in photo_files:
        expected = keras_center_crop(keras_pixels(path), *size)
        ours = preprocess(path, spec)
        assert ours.shape == expected.shape == (*size, 3)
        assert np.max(np.abs(ours - expected)) <= RESIZE_TOLERANCE


def test_grayscale_photo_matches_keras_on_every_channel(gray_file):
    keras_gray = keras_pixels(gray_file, color_mode="grayscale")
    assert keras_gray.shape == (1, 427, 640, 1)
    cropped = preprocess(gray_file, PreprocessingSpec(70, 120, crop="center", scale=1.0))
    expected = keras_center_crop(keras_gray, 70, 120)
    for channel in range(3):
        np.testing.assert_array_equal(cropped[..., channel], expected[..., 0])
    resized = preprocess(gray_file, PreprocessingSpec(480, 480, crop="center", scale=1.0))
    expected = keras_center_crop(keras_gray, 480, 480)
    for channel in range(3):
        assert np.max(np.abs(resized[..., channel] - expected[..., 0])) <= RESIZE_TOLERANCE


def test_a_small_array_is_upscaled_as_keras_center_crop_does():
    digit = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    expected = keras_center_crop(digit[None, :, :, None].astype(np.float32), 28, 28)[..., 0]
    ours = preprocess(digit, PreprocessingSpec(28, 28, crop="center", scale=1.0))
    assert np.max(np.abs(ours[..., 1] - expected)) <= RESIZE_TOLERANCE


def test_center_spec_round_trips_through_json_at_version_1():
    spec = PreprocessingSpec(70, 120, crop="center")
    text = spec.to_json()
    assert json.loads(text)["spec_version"] == 1 and json.loads(text)["crop"] == "center"
    assert PreprocessingSpec.from_json(text) == spec
    assert set(CROP_MODES) == {"center", "center_to_aspect_ratio"}
    with pytest.raises(ValueError, match="unsupported crop 'centre'"):
        PreprocessingSpec(70, 120, crop="centre")
    with pytest.raises(ValueError, match="unsupported crop"):
        PreprocessingSpec.from_json(text.replace('"center"', '"stretch"'))


def test_a_version_1_spec_from_before_the_center_mode_loads_and_behaves_unchanged(photo_files):
    spec = PreprocessingSpec.from_json(SPEC_V1_JSON)
    assert spec == PreprocessingSpec(28, 28) and spec.crop == "center_to_aspect_ratio"
    assert spec.to_json() == SPEC_V1_JSON
    resizing = keras.Sequential([keras.layers.Resizing(28, 28, crop_to_aspect_ratio=True),
                                 keras.layers.Rescaling(1.0 / 255)])
    for path in photo_files:
        expected = np.asarray(resizing(keras_pixels(path)))[0]
        assert np.max(np.abs(preprocess(path, spec) - expected)) <= RESIZE_TOLERANCE / 255
