"""Decoding within limits, in the one preprocessing the client, training and server share."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from convserve_client.errors import ConvserveError, ImageError
from convserve_client.preprocessing import (
    DEFAULT_MAX_IMAGE_PIXELS,
    PreprocessingSpec,
    load_image,
    preprocess,
    preprocess_batch,
)
from convserve_protocol import preprocessing as shared
from tests.images import bomb_png, encode
from tests.memory import MIB, peak_rss_bytes, reset_peak_rss

SPECS = [PreprocessingSpec(28, 28), PreprocessingSpec(70, 120), PreprocessingSpec(500, 300),
         PreprocessingSpec(70, 120, crop="center"), PreprocessingSpec(9, 5, crop="center"),
         PreprocessingSpec(500, 700, crop="center")]




@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(load_sample_images().images[0])


def test_a_decompression_bomb_is_refused_from_its_header_quickly_and_cheaply():
    bomb = bomb_png(12_000)
    assert len(bomb) < 32 * 1024
    baseline = reset_peak_rss()
    started = time.monotonic()
    for call in (lambda: preprocess(bomb, PreprocessingSpec(28, 28)), lambda: load_image(bomb)):
        with pytest.raises(ImageError, match=r"12000x12000 = 144,000,000 pixels, over the limit of 50,000,000"):
            call()
    assert time.monotonic() - started < 2.0  # decoding it used to take 8 s
    assert peak_rss_bytes() - baseline < 100 * MIB  # and 2.1 GB


def test_the_pixel_limit_is_a_parameter_and_the_error_is_the_sdks(photo, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(photo, "JPEG"))
    assert 427 * 640 < DEFAULT_MAX_IMAGE_PIXELS
    assert preprocess(path, PreprocessingSpec(28, 28)).shape == (28, 28, 3)
    with pytest.raises(ImageError) as caught:
        preprocess_batch([np.zeros((4, 4), np.uint8), path], PreprocessingSpec(28, 28), max_pixels=427 * 640 - 1)
    error = caught.value
    assert error.index == 1 and error.source == str(path) and "over the limit of 273,279 pixels" in str(error)
    assert isinstance(error, ConvserveError) and isinstance(error, shared.ImageError)


def test_a_big_legal_image_costs_its_decode_not_an_rgb_float_copy():
    big = bomb_png(6_000)  # 36 megapixels
    baseline = reset_peak_rss()
    assert preprocess(big, PreprocessingSpec(224, 224)).shape == (224, 224, 3)
    # Pillow holds a one-bit image in a byte a pixel (36 MB); as RGB float32 it would be 432 MB.
    assert peak_rss_bytes() - baseline < 150 * MIB


@pytest.mark.parametrize("mode, image_format", [
    ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("LA", "PNG"),
    ("I;16", "PNG"), ("1", "PNG"), ("P", "GIF"), ("RGB", "WEBP"), ("RGB", "TIFF"),
])
def test_converting_only_the_kept_rows_gives_the_pixels_of_converting_everything(photo, mode, image_format):
    data = encode(photo.convert(mode), image_format)
    decoded_whole = load_image(data)
    for spec in SPECS:
        np.testing.assert_array_equal(preprocess(data, spec), preprocess(decoded_whole, spec))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotation_is_applied_before_the_crop(photo, orientation):
    exif = photo.getexif()
    exif[0x0112] = orientation
    data = encode(photo.crop((0, 0, 301, 200)), "JPEG", exif=exif.tobytes())
    upright = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").transpose(
        {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}[orientation]))
    assert load_image(data).shape == upright.shape
    for spec in SPECS:
        np.testing.assert_array_equal(preprocess(data, spec), preprocess(upright, spec))


def test_eps_is_not_handed_to_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageError, match="not a recognised image format"):
        preprocess(eps, PreprocessingSpec(8, 8))


@pytest.mark.parametrize("damage", [lambda data: data[: len(data) // 2], lambda data: data[:40] + b"\0" * 200])
def test_damaged_files_are_image_errors(photo, damage):
    with pytest.raises(ImageError, match="cannot decode image|not a recognised image format"):
        preprocess(damage(encode(photo, "PNG")), PreprocessingSpec(8, 8))
