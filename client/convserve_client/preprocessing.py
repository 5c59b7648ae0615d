"""The client's face of the one preprocessing definition, :mod:`convserve_protocol.preprocessing`.

Training and the SDK call :func:`preprocess` from here, and the server applies the
same module to encoded images, so a model sees exactly the pixels it was trained
on whoever decodes the image.  This module re-exports it, reads paths itself
(regular files only, within a byte limit) and turns its errors into the SDK's
:class:`~convserve_client.errors.ImageError` (a
:class:`~convserve_client.errors.ConvserveError`); see the contract module for
the steps.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import numpy as np

from convserve_client import _inputs
from convserve_client.errors import ImageError
from convserve_protocol import preprocessing as _shared
from convserve_protocol.preprocessing import (
    CROP_MODES,
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageInput,
    ImageTooLarge,
    PreprocessingSpec,
    aspect_crop_box,
    center_crop,
    crop_box,
    crop_to_aspect_and_resize,
    describe_source,
    fit_to_input,
    rescale,
    resize_bilinear,
)

__all__ = [
    "CROP_MODES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageError",
    "ImageInput",
    "ImageTooLarge",
    "PreprocessingSpec",
    "aspect_crop_box",
    "center_crop",
    "crop_box",
    "crop_to_aspect_and_resize",
    "describe_source",
    "fit_to_input",
    "load_image",
    "preprocess",
    "preprocess_batch",
    "rescale",
    "resize_bilinear",
]

Result = TypeVar("Result")


def _with_paths_read(images: Sequence[ImageInput], max_bytes: int, batch: bool,
                     decode: Callable[[list[ImageInput]], Result]) -> Result:
    """``decode(images)`` with each path replaced by its file's bytes, read by
    :func:`~convserve_client._inputs.read_image_file` (regular files only, at most ``max_bytes``): the
    contract's own reading would block on a FIFO and read a device without end.  Errors are the SDK's
    :class:`ImageError`, naming the caller's image (and its index, for a ``batch``)."""
    loaded: list[ImageInput] = []
    for index, image in enumerate(images):
        try:
            loaded.append(_inputs.loaded(image, max_bytes))
        except ImageError as exc:
            exc.index = index if batch else None
            raise
    try:
        return decode(loaded)
    except _shared.ImageError as exc:
        where = exc.index if batch and exc.index is not None else 0
        raise _inputs.renamed(exc, images[where], loaded[where], exc.index if batch else None) from exc


def load_image(image: ImageInput, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, *,
               max_bytes: int = _inputs.DEFAULT_MAX_IMAGE_BYTES) -> np.ndarray:
    """:func:`convserve_protocol.preprocessing.load_image`, reading a path safely (see :func:`preprocess`)."""
    return _with_paths_read([image], max_bytes, False, lambda loaded: _shared.load_image(loaded[0], max_pixels))


def preprocess(image: ImageInput, spec: PreprocessingSpec, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, *,
               max_bytes: int = _inputs.DEFAULT_MAX_IMAGE_BYTES) -> np.ndarray:
    """:func:`convserve_protocol.preprocessing.preprocess`, raising the SDK's :class:`ImageError`; a path is
    read only if it is a regular file (not a FIFO or a device) of at most ``max_bytes`` bytes."""
    return _with_paths_read([image], max_bytes, False, lambda loaded: _shared.preprocess(loaded[0], spec, max_pixels))


def preprocess_batch(images: Sequence[ImageInput], spec: PreprocessingSpec,
                     max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, *,
                     max_bytes: int = _inputs.DEFAULT_MAX_IMAGE_BYTES) -> np.ndarray:
    """:func:`convserve_protocol.preprocessing.preprocess_batch`, reading paths safely (see :func:`preprocess`)."""
    return _with_paths_read(list(images), max_bytes, True,
                            lambda loaded: _shared.preprocess_batch(loaded, spec, max_pixels))
