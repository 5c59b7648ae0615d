"""Image files the tests make: encoded in memory, decompression bombs, and malformed files."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image


def encode(pixels: np.ndarray | Image.Image, image_format: str, **options: object) -> bytes:
    """``pixels`` as the bytes of an ``image_format`` file (PNG, JPEG, ...)."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def bomb_png(side: int) -> bytes:
    """A one-bit black PNG of ``side``×``side``: kilobytes on the wire, ``side``² pixels decoded."""
    return encode(Image.new("1", (side, side)), "PNG", optimize=True)


TIFF_SAMPLES_PER_PIXEL_TAG = 277


def tiff_with_samples_per_pixel(samples: int) -> bytes:
    """An 8×8 RGB TIFF whose header claims ``samples`` samples per pixel: Pillow refuses it and logs an ERROR."""
    data = bytearray(encode(Image.new("RGB", (8, 8), (1, 2, 3)), "TIFF"))
    assert data[:2] == b"II", "Pillow writes little-endian TIFF"
    directory = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, directory)[0]):
        offset = directory + 2 + 12 * entry
        if struct.unpack_from("<H", data, offset)[0] == TIFF_SAMPLES_PER_PIXEL_TAG:
            struct.pack_into("<H", data, offset + 8, samples)  # a SHORT value sits in the entry's value field
            return bytes(data)
    raise AssertionError("no SamplesPerPixel entry in Pillow's TIFF")
