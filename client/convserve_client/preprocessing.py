"""The one preprocessing definition shared by training and serving.

Training (``convserve_training``) and the client SDK both call
:func:`preprocess`, so a model sees at serving time exactly the pixels it
was trained on.  The steps mirror the Keras layers of the original design:

1. decode to an RGB ``uint8`` (or float, 0..255) array;
2. fit it to the model's input size, as the spec's ``crop`` mode says:

   - ``center_to_aspect_ratio`` (the default): crop the largest centred box
     of the model's aspect ratio and resize it bilinearly (half-pixel
     centres, no antialiasing), as
     ``keras.layers.Resizing(..., crop_to_aspect_ratio=True)`` does;
   - ``center``: cut out the centred ``height``×``width`` window, no resize,
     as ``keras.layers.CenterCrop`` does; an image smaller than the window in
     either dimension is cropped to the aspect ratio and resized instead,
     which is what ``CenterCrop`` does then too;

3. rescale, ``x * scale + offset`` in float32, as ``keras.layers.Rescaling``.

The spec (:class:`~convserve_protocol.preprocessing_spec.PreprocessingSpec`) is part of the
contract package and travels inside the model file, so nothing here hard-codes a size.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from convserve_client.errors import ImageError
from convserve_protocol.preprocessing_spec import PreprocessingSpec

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]
"""Anything :func:`load_image` accepts: a path, encoded bytes, a Pillow image or an array."""

def describe_source(image: object) -> str:
    """A short human name for an image input, used in error messages."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} encoded bytes>"
    if isinstance(image, Image.Image):
        return f"<Pillow image {image.mode} {image.width}x{image.height}>"
    if isinstance(image, np.ndarray):
        return f"<array {image.dtype} {'x'.join(map(str, image.shape))}>"
    return f"<{type(image).__name__}>"


def load_image(image: ImageInput) -> np.ndarray:
    """Decode any supported input to an H×W×3 array (uint8, or float32 on a 0..255 scale).

    Grayscale is repeated to three channels and an alpha channel is dropped.
    Float arrays are taken to hold pixel values on the 0..255 scale, as
    ``keras.utils.img_to_array`` gives them.  Raises :class:`ImageError`.
    """
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(image)), describe_source(image))
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{path}: cannot read: {exc.strerror or exc}", source=str(path)) from exc
        return _decode(io.BytesIO(data), str(path))
    raise ImageError(f"unsupported image input of type {type(image).__name__}", source=describe_source(image))


def _decode(stream: io.BytesIO, source: str) -> np.ndarray:
    try:
        with Image.open(stream) as opened:
            opened.load()
            return _pil_to_rgb(ImageOps.exif_transpose(opened))
    except UnidentifiedImageError as exc:
        raise ImageError(f"{source}: not a recognised image format", source=source) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{source}: cannot decode image: {exc}", source=source) from exc


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    source = describe_source(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"{source}: expected H×W, H×W×1, H×W×3 or H×W×4", source=source)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{source}: image is empty", source=source)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        converted = array.astype(np.float32)
        if not np.all(np.isfinite(converted)):
            raise ImageError(f"{source}: contains NaN or infinity", source=source)
        return converted
    raise ImageError(f"{source}: dtype must be uint8 or floating point", source=source)


def aspect_crop_box(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int, int, int]:
    """The centred (top, left, crop_height, crop_width) box of the target's aspect ratio.

    Computed as Keras does for ``crop_to_aspect_ratio=True``, in float32, so
    the integer box matches it exactly.  ``CenterCrop`` on an image smaller
    than its window computes the same box in Python floats when the image's
    size is known; the two agree while ``width * target_height`` and
    ``height * target_width`` stay below 2**24, far beyond photo sizes.
    """
    crop_height = int(np.float32(width * target_height) / np.float32(target_width))
    crop_height = max(min(height, crop_height), 1)
    crop_width = int(np.float32(height * target_width) / np.float32(target_height))
    crop_width = max(min(width, crop_width), 1)
    top = int(np.float32(height - crop_height) / np.float32(2))
    left = int(np.float32(width - crop_width) / np.float32(2))
    return top, left, crop_height, crop_width


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centred ``height``×``width`` window of an image at least that large, as Keras ``CenterCrop`` cuts it.

    An odd surplus leaves the extra row or column below and to the right (``top = surplus // 2``).
    """
    if image.shape[0] < height or image.shape[1] < width:
        raise ValueError(f"cannot crop {image.shape[0]}x{image.shape[1]} to {height}x{width}")
    top = (image.shape[0] - height) // 2
    left = (image.shape[1] - width) // 2
    return image[top : top + height, left : left + width]


def _interpolation_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = np.float32(in_size) / np.float32(out_size)
    positions = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floors = np.floor(positions)
    lower = np.maximum(floors.astype(np.int64), 0)
    upper = np.minimum(np.ceil(positions).astype(np.int64), in_size - 1)
    return lower, upper, (positions - floors).astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and no antialiasing, in float32.

    The same arithmetic as TensorFlow's ``resize_bilinear(half_pixel_centers=True)``,
    which ``keras.layers.Resizing`` uses.
    """
    source = image.astype(np.float32, copy=False)
    if source.shape[0] == height and source.shape[1] == width:
        return source.copy()
    top, bottom, y_lerp = _interpolation_weights(source.shape[0], height)
    left, right, x_lerp = _interpolation_weights(source.shape[1], width)
    x_lerp = x_lerp[None, :, None]
    rows_top = source[top]
    rows_bottom = source[bottom]
    top_row = rows_top[:, left] + (rows_top[:, right] - rows_top[:, left]) * x_lerp
    bottom_row = rows_bottom[:, left] + (rows_bottom[:, right] - rows_bottom[:, left]) * x_lerp
    return top_row + (bottom_row - top_row) * y_lerp[:, None, None]


def rescale(image: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """``image * scale + offset`` in float32, as ``keras.layers.Rescaling`` computes it."""
    return image.astype(np.float32, copy=False) * np.float32(scale) + np.float32(offset)


def crop_to_aspect_and_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The largest centred box of the target's aspect ratio, resized bilinearly to ``height``×``width``.

    Keras ``Resizing(crop_to_aspect_ratio=True)``, and ``keras.utils.smart_resize``.
    """
    top, left, crop_height, crop_width = aspect_crop_box(image.shape[0], image.shape[1], height, width)
    return resize_bilinear(image[top : top + crop_height, left : left + crop_width], height, width)


def fit_to_input(image: np.ndarray, spec: PreprocessingSpec) -> np.ndarray:
    """Crop (and where the mode needs it, resize) a decoded image to the spec's input size."""
    if spec.crop == "center" and image.shape[0] >= spec.height and image.shape[1] >= spec.width:
        return center_crop(image, spec.height, spec.width)
    # The default mode always comes here; ``center`` does on an image smaller than its window,
    # because Keras CenterCrop then falls back to smart_resize, the same crop-and-resize.
    return crop_to_aspect_and_resize(image, spec.height, spec.width)


def preprocess(image: ImageInput, spec: PreprocessingSpec) -> np.ndarray:
    """One image, any supported input, to a float32 H×W×3 model input."""
    return rescale(fit_to_input(load_image(image), spec), spec.scale, spec.offset)


@dataclass(frozen=True)
class PreprocessedImages:
    """The good images as one float32 (N, H, W, 3) batch, and per input either its row or its error."""

    batch: np.ndarray
    slots: list[int | ImageError]

    @property
    def first_error(self) -> ImageError | None:
        """The error of the first input that failed, if any did."""
        return next((slot for slot in self.slots if isinstance(slot, ImageError)), None)


def preprocess_images(images: Sequence[ImageInput], spec: PreprocessingSpec) -> PreprocessedImages:
    """Preprocess every image, recording (not raising) the error of each one that fails, with its index."""
    rows: list[np.ndarray] = []
    slots: list[int | ImageError] = []
    for index, image in enumerate(images):
        try:
            rows.append(preprocess(image, spec))
            slots.append(len(rows) - 1)
        except ImageError as exc:
            exc.index = index
            slots.append(exc)
        except Exception as exc:  # a decoder's own bug must still be that image's error alone
            slots.append(ImageError(f"{describe_source(image)}: {exc}", describe_source(image), index))
    shape = (len(rows), spec.height, spec.width, spec.channels)
    batch = np.stack(rows) if rows else np.empty(shape, dtype=np.float32)
    return PreprocessedImages(batch=batch, slots=slots)


def preprocess_batch(images: Sequence[ImageInput], spec: PreprocessingSpec) -> np.ndarray:
    """Many images to one float32 (N, H, W, 3) batch; raises :class:`ImageError` naming the first bad one."""
    prepared = preprocess_images(images, spec)
    if prepared.first_error is not None:
        raise prepared.first_error
    return prepared.batch
