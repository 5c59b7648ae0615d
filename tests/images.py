"""Image files the tests make: encoded in memory, and decompression bombs."""

from __future__ import annotations

import io

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
