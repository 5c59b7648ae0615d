"""Turning the caller's image inputs into what a request carries: file bytes read safely, encoded images."""

from __future__ import annotations

import io
import os
import stat

import numpy as np
from PIL import Image

from convserve_client.errors import ImageError
from convserve_protocol import preprocessing as _shared
from convserve_protocol.preprocessing import ImageInput, describe_source

DEFAULT_MAX_IMAGE_BYTES = 16 * 1024 * 1024
"""Most bytes read from one image file (and, preprocessed by the server, sent for one image): the server's
default ``--max-image-bytes``."""

PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
"""Pillow modes a PNG file holds as they are; images in any other mode are converted to RGB first."""


def read_image_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path``, at most ``max_bytes``; :class:`ImageError` otherwise.

    The file is opened without blocking and checked to be a regular file before anything is read, so a
    FIFO with no writer or a device such as ``/dev/zero`` is refused at once instead of hanging or
    reading without end.
    """
    name = os.fspath(path)
    try:
        descriptor = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ImageError(f"{name}: cannot read: {exc.strerror or exc}", name) from exc
    try:
        regular = stat.S_ISREG(os.fstat(descriptor).st_mode)
    except OSError as exc:
        os.close(descriptor)
        raise ImageError(f"{name}: cannot read: {exc.strerror or exc}", name) from exc
    if not regular:  # checked before os.fdopen, which refuses a folder with EISDIR and would leak the descriptor
        os.close(descriptor)
        raise ImageError(f"{name}: not a regular file", name)
    with os.fdopen(descriptor, "rb") as file:
        try:
            data = file.read(max_bytes + 1)
        except OSError as exc:
            raise ImageError(f"{name}: cannot read: {exc.strerror or exc}", name) from exc
    if len(data) > max_bytes:
        raise ImageError(f"{name}: over the limit of {max_bytes:,} bytes per image", name)
    return data


def loaded(image: ImageInput, max_bytes: int) -> ImageInput:
    """``image`` with a path replaced by its file's bytes (read by :func:`read_image_file`)."""
    if isinstance(image, (str, os.PathLike)):
        return read_image_file(image, max_bytes)
    return image


def renamed(error: _shared.ImageError, image: ImageInput, loaded_image: ImageInput, index: int | None) -> ImageError:
    """``error`` (about ``loaded_image``) naming the caller's ``image`` and its ``index`` instead."""
    source, loaded_source = describe_source(image), describe_source(loaded_image)
    return ImageError(error.message.replace(loaded_source, source, 1), source, index)


def encoded(image: ImageInput, max_bytes: int) -> bytes | None:
    """The encoded bytes the server should decode for ``image``; None for an array (sent as a tensor).

    Paths are sent as their file's bytes, bytes as given and Pillow images as PNG.
    """
    if isinstance(image, np.ndarray):
        return None
    if isinstance(image, Image.Image):
        data = _as_png(image)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        data = read_image_file(image, max_bytes)
    else:
        raise ImageError(f"unsupported image input of type {type(image).__name__}", describe_source(image))
    if len(data) > max_bytes:
        source = describe_source(image)
        raise ImageError(f"{source}: {len(data):,} encoded bytes, over the limit of {max_bytes:,} per image", source)
    return data


def _as_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    (image if image.mode in PNG_MODES else image.convert("RGB")).save(buffer, format="PNG")
    return buffer.getvalue()
