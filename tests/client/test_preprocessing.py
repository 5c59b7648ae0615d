"""The shared preprocessing against TensorFlow's own Keras layers, on the seed's sample photos."""

from __future__ import annotations

import io

import keras  # TensorFlow's Keras: a test dependency only, for the parity checks
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from convserve_client.errors import ImageError
from convserve_client.preprocessing import (
    PreprocessingSpec,
    aspect_crop_box,
    load_image,
    preprocess,
    preprocess_batch,
    rescale,
)

RESIZE_TOLERANCE = 1e-3
"""Largest |ours − Keras Resizing| on the 0..255 scale: float32 rounding only."""



@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    images = load_sample_images().images
    assert all(image.shape == (427, 640, 3) for image in images)
    return images


def test_rescaling_equals_keras_rescaling_bit_for_bit(photos):
    layer = keras.layers.Rescaling(1.0 / 255)
    for photo in photos:
        expected = np.asarray(layer(photo[None].astype(np.float32)))[0]
        np.testing.assert_array_equal(rescale(photo, 1.0 / 255, 0.0), expected)


@pytest.mark.parametrize("size", [(28, 28), (70, 120), (224, 224), (300, 100), (427, 640)])
def test_crop_and_resize_match_keras_resizing_with_crop_to_aspect_ratio(photos, size):
    layer = keras.layers.Resizing(*size, crop_to_aspect_ratio=True)
    spec = PreprocessingSpec(height=size[0], width=size[1], scale=1.0)
    for photo in photos:
        expected = np.asarray(layer(photo[None].astype(np.float32)))[0]
        ours = preprocess(photo, spec)
        assert ours.shape == expected.shape
        assert np.max(np.abs(ours - expected)) <= RESIZE_TOLERANCE


def test_upscaling_small_digits_matches_keras(photos):
    digit = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    layer = keras.layers.Resizing(28, 28, crop_to_aspect_ratio=True)
    expected = np.asarray(layer(np.repeat(digit[None, :, :, None], 3, axis=3).astype(np.float32)))[0]
    assert np.max(np.abs(preprocess(digit, PreprocessingSpec(28, 28, scale=1.0)) - expected)) <= RESIZE_TOLERANCE


def test_aspect_crop_box_is_centred_and_keeps_the_target_ratio():
    assert aspect_crop_box(427, 640, 28, 28) == (0, 106, 427, 427)
    assert aspect_crop_box(427, 640, 70, 120) == (27, 0, 373, 640)


def test_every_input_kind_gives_the_same_pixels(photos, tmp_path):
    photo = photos[0][:50, :60]
    spec = PreprocessingSpec(28, 28)
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    rgba = np.concatenate([photo, np.full((*photo.shape[:2], 1), 7, np.uint8)], axis=2)
    expected = preprocess(photo, spec)
    for kind in (path, str(path), buffer.getvalue(), Image.open(path), rgba, photo.astype(np.float64)):
        np.testing.assert_allclose(preprocess(kind, spec), expected, atol=1e-6)


def test_grayscale_is_repeated_to_three_channels():
    gray = np.arange(100, dtype=np.uint8).reshape(10, 10)
    rgb = load_image(gray)
    assert rgb.shape == (10, 10, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert load_image(Image.fromarray(gray)).shape == (10, 10, 3)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"definitely not a png", "not a recognised image format"),
        (np.zeros((4, 4, 2), np.uint8), "expected H×W"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.zeros((4, 4, 3), np.int64), "dtype"),
        (12345, "unsupported image input"),
    ],
)
def test_bad_images_raise_image_error_naming_them(image, message):
    with pytest.raises(ImageError, match=message):
        load_image(image)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageError, match="missing.png: cannot read"):
        load_image(tmp_path / "missing.png")


def test_batch_error_carries_the_index():
    with pytest.raises(ImageError) as caught:
        preprocess_batch([np.zeros((4, 4, 3), np.uint8), b"junk"], PreprocessingSpec(8, 8))
    assert caught.value.index == 1


def test_spec_round_trips_through_json_and_rejects_nonsense():
    spec = PreprocessingSpec(32, 48)
    assert PreprocessingSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError):
        PreprocessingSpec.from_json('{"spec_version": 99, "height": 1, "width": 1}')
    with pytest.raises(ValueError):
        PreprocessingSpec(0, 5)
