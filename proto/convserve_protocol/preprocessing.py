"""The one preprocessing definition shared by training, the client and the server.

Training (``convserve_training``) and the client SDK call :func:`preprocess`
(through ``convserve_client.preprocessing``), and the server calls
:func:`preprocess_batch` on the encoded images of a ``Classify`` request, so a
model sees at serving time exactly the pixels it was trained on, whoever
decodes the image.  The steps mirror the Keras layers of the original design:

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

Encoded images (paths, bytes) are guarded against decompression bombs: the
pixel count is read from the header and checked against a limit before any
pixel is decoded, and only the crop is converted to RGB, so memory follows the
crop rather than the file's pixel format.  Reduced decoding (Pillow's JPEG
``draft``) is not used: it averages DCT blocks where bilinear resizing samples
single pixels, so it would change the result.

Pillow is imported only when an image is decoded: this module needs numpy
alone to import, so the server can import it without loading Pillow (install
``convserve-protocol[images]`` to decode).
"""

from __future__ import annotations

import functools
import io
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, Union

import numpy as np

from convserve_protocol.preprocessing_spec import CROP_MODES, PreprocessingSpec

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "CROP_MODES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageError",
    "ImageInput",
    "ImageTooLarge",
    "PreprocessingSpec",
    "aspect_crop_box",
    "center_crop",
    "check_pixel_count",
    "crop_box",
    "crop_to_aspect_and_resize",
    "decode_opened",
    "describe_source",
    "fit_to_input",
    "load_image",
    "open_header",
    "preprocess",
    "preprocess_batch",
    "rescale",
    "resize_bilinear",
]

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, "Image.Image", np.ndarray]
"""Anything :func:`load_image` accepts: a path, encoded bytes, a Pillow image or an array."""

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
"""Most pixels an encoded image may declare (width × height) before it is refused undecoded.

50 megapixels takes the largest phone photos (8160×6120); decoding one costs about 3 bytes a pixel.
A 17 KiB PNG can declare 12000×12000 (144 megapixels), which would take 0.4 GB as RGB."""

# Ghostscript runs for EPS files: not something to start on a caller's bytes.
_EXCLUDED_FORMATS = frozenset({"EPS"})


class ImageError(ValueError):
    """An input image could not be read or decoded; names the image, and its index in a batch."""

    def __init__(self, message: str, source: str, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.index = index

    def __str__(self) -> str:
        return self.message


class ImageTooLarge(ImageError):
    """An encoded image declares more pixels than the limit allows; refused before decoding."""

    def __init__(self, message: str, source: str, pixels: int, limit: int) -> None:
        super().__init__(message, source)
        self.pixels = pixels
        self.limit = limit


# --- decoding ----------------------------------------------------------------------------------


def _pillow_image_type() -> type | None:
    """Pillow's image class if Pillow is loaded; an object cannot be a Pillow image otherwise."""
    module = sys.modules.get("PIL.Image")
    return getattr(module, "Image", None)


def _is_pillow_image(image: object) -> bool:
    image_type = _pillow_image_type()
    return image_type is not None and isinstance(image, image_type)


def describe_source(image: object) -> str:
    """A short human name for an image input, used in error messages."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} encoded bytes>"
    if _is_pillow_image(image):
        return f"<Pillow image {image.mode} {image.width}x{image.height}>"  # type: ignore[attr-defined]
    if isinstance(image, np.ndarray):
        return f"<array {image.dtype} {'x'.join(map(str, image.shape))}>"
    return f"<{type(image).__name__}>"


@functools.cache
def _readable_formats() -> tuple[str, ...]:
    """Every format Pillow reads, but those in :data:`_EXCLUDED_FORMATS` (all plugins registered once).

    Also silences Pillow's DecompressionBombWarning, which it gives while opening an image over its own
    89-megapixel mark: the caller's ``max_pixels`` limit refuses such images (or allows them on purpose).
    """
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    Image.init()
    return tuple(name for name in Image.ID if name not in _EXCLUDED_FORMATS)


def _encoded(image: object) -> tuple[bytes, str] | None:
    """The bytes and name of an encoded input (bytes or a path); None for decoded inputs."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), describe_source(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            return path.read_bytes(), str(path)
        except OSError as exc:
            raise ImageError(f"{path}: cannot read: {exc.strerror or exc}", source=str(path)) from exc
    return None


def check_pixel_count(width: int, height: int, max_pixels: int, source: str) -> None:
    """Refuse an image declaring more than ``max_pixels`` pixels, naming its size and the limit."""
    pixels = width * height
    if pixels > max_pixels:
        raise ImageTooLarge(f"{source}: image is {width}x{height} = {pixels:,} pixels, over the limit of "
                            f"{max_pixels:,} pixels", source=source, pixels=pixels, limit=max_pixels)


def open_header(data: bytes, source: str, max_pixels: int, formats: Sequence[str] | None = None) -> Image.Image:
    """Encoded bytes opened (the header read, no pixel decoded) after checking its size against ``max_pixels``.

    ``formats`` restricts the Pillow plugins tried (default: every readable one but EPS).  Raises
    :class:`ImageTooLarge` or :class:`ImageError`.  The caller closes the image.
    """
    from PIL import Image, UnidentifiedImageError

    readable = _readable_formats()  # also registers every plugin and quiets Pillow's bomb warning
    if formats is not None:
        readable = tuple(formats)
    try:
        opened = Image.open(io.BytesIO(data), formats=readable)
    except UnidentifiedImageError as exc:
        raise ImageError(f"{source}: not a recognised image format", source=source) from exc
    except Image.DecompressionBombError as exc:  # Pillow's own ceiling, if ours was set above it
        raise ImageTooLarge(f"{source}: {exc}", source=source, pixels=0, limit=max_pixels) from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's header parsers raise all sorts on hostile bytes; each means the same
        raise ImageError(f"{source}: cannot decode image: {exc or type(exc).__name__}", source=source) from exc
    try:
        check_pixel_count(opened.width, opened.height, max_pixels, source)  # the header only: nothing decoded yet
    except ImageError:
        opened.close()
        raise
    return opened


def decode_opened(opened: Image.Image, source: str) -> Image.Image:
    """Decode an image :func:`open_header` opened, EXIF rotation applied; closes it if that fails."""
    from PIL import ImageOps

    try:
        opened.load()
        ImageOps.exif_transpose(opened, in_place=True)
        return opened
    except (ImageError, MemoryError):
        opened.close()
        raise
    except Exception as exc:  # and so do its decoders
        opened.close()
        raise ImageError(f"{source}: cannot decode image: {exc or type(exc).__name__}", source=source) from exc


def _open(data: bytes, source: str, max_pixels: int) -> Image.Image:
    """Decode encoded bytes after checking the header's size; EXIF rotation applied.  The caller closes it."""
    return decode_opened(open_header(data, source, max_pixels), source)


def _pillow_to_rgb(image: Image.Image, source: str) -> np.ndarray:
    """A Pillow image as an H×W×3 uint8 array (grayscale repeated, alpha dropped)."""
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise ImageError(f"{source}: cannot convert {image.mode} to RGB: {exc}", source=source) from exc


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


def load_image(image: ImageInput, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode any supported input to an H×W×3 array (uint8, or float32 on a 0..255 scale).

    Grayscale is repeated to three channels and an alpha channel is dropped.
    Float arrays are taken to hold pixel values on the 0..255 scale, as
    ``keras.utils.img_to_array`` gives them.  An encoded image (path or bytes)
    declaring more than ``max_pixels`` pixels raises :class:`ImageTooLarge`
    before it is decoded.  Raises :class:`ImageError`.
    """
    return _by_kind(image, max_pixels, _array_to_rgb, _pillow_to_rgb)


def _by_kind(image: ImageInput, max_pixels: int, from_array: Callable[[np.ndarray], np.ndarray],
             from_pillow: Callable[[Image.Image, str], np.ndarray]) -> np.ndarray:
    """``from_array`` of an array; else ``from_pillow`` of a Pillow image, or of an encoded one (path or bytes)
    opened here, with a name for the input to put in errors."""
    if isinstance(image, np.ndarray):
        return from_array(image)
    if _is_pillow_image(image):
        return from_pillow(image, describe_source(image))  # type: ignore[arg-type]
    encoded = _encoded(image)
    if encoded is None:
        raise ImageError(f"unsupported image input of type {type(image).__name__}", source=describe_source(image))
    data, source = encoded
    opened = _open(data, source, max_pixels)
    try:
        return from_pillow(opened, source)
    finally:
        opened.close()


# --- fitting to the model's input ----------------------------------------------------------------


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


def crop_box(height: int, width: int, spec: PreprocessingSpec) -> tuple[int, int, int, int]:
    """The (top, left, crop_height, crop_width) part of a ``height``×``width`` image that the spec keeps.

    ``center`` on an image at least as large as the window: the centred window, as Keras ``CenterCrop``
    cuts it (an odd surplus leaves the extra row or column below and to the right).  Otherwise (always
    for the default mode; for ``center`` on a smaller image, because ``CenterCrop`` then falls back to
    ``smart_resize``) the box of the model's aspect ratio, which is then resized to the input size.
    """
    if spec.crop == "center" and height >= spec.height and width >= spec.width:
        return (height - spec.height) // 2, (width - spec.width) // 2, spec.height, spec.width
    return aspect_crop_box(height, width, spec.height, spec.width)


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
    which ``keras.layers.Resizing`` uses.  Only the sampled pixels are converted
    to float32, so memory follows the output size, not the source's.
    """
    if image.shape[0] == height and image.shape[1] == width:
        return image.astype(np.float32)
    top, bottom, y_lerp = _interpolation_weights(image.shape[0], height)
    return _blend(image[top], image[bottom], y_lerp, width)


def _blend(rows_top: np.ndarray, rows_bottom: np.ndarray, y_lerp: np.ndarray, width: int) -> np.ndarray:
    """The bilinear blend of the source rows above and below each output row, resized to ``width``."""
    left, right, x_lerp = _interpolation_weights(rows_top.shape[1], width)
    x_lerp = x_lerp[None, :, None]
    top_left = rows_top[:, left].astype(np.float32)
    bottom_left = rows_bottom[:, left].astype(np.float32)
    top_row = top_left + (rows_top[:, right].astype(np.float32) - top_left) * x_lerp
    bottom_row = bottom_left + (rows_bottom[:, right].astype(np.float32) - bottom_left) * x_lerp
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
    """Crop (and where the mode needs it, resize) a decoded image to the spec's input size, in float32."""
    top, left, crop_height, crop_width = crop_box(image.shape[0], image.shape[1], spec)
    return resize_bilinear(image[top : top + crop_height, left : left + crop_width], spec.height, spec.width)


def _fit_pillow(image: Image.Image, spec: PreprocessingSpec, source: str) -> np.ndarray:
    """:func:`fit_to_input` on a Pillow image, converting to RGB only the rows the result is made of.

    Every conversion to RGB works pixel by pixel, so converting the kept rows alone gives the same
    pixels as converting the whole image first, while memory follows the output size, not the image's.
    """
    top, left, crop_height, crop_width = crop_box(image.height, image.width, spec)
    if crop_height == spec.height and crop_width == spec.width:
        window = image.crop((left, top, left + crop_width, top + crop_height))
        return _pillow_to_rgb(window, source).astype(np.float32)
    rows_top, rows_bottom, y_lerp = _interpolation_weights(crop_height, spec.height)
    needed = np.unique(np.concatenate([rows_top, rows_bottom]))
    rows = _rgb_rows(image, top, left, crop_width, needed, source)
    return _blend(rows[np.searchsorted(needed, rows_top)], rows[np.searchsorted(needed, rows_bottom)],
                  y_lerp, spec.width)


def _rgb_rows(image: Image.Image, top: int, left: int, width: int, rows: np.ndarray, source: str) -> np.ndarray:
    """Rows ``rows`` (ascending, relative to ``top``) of the ``width`` columns from ``left``, as RGB uint8.

    Consecutive rows are cropped and converted together, one run at a time.
    """
    runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    pieces = []
    for run in runs:
        first, last = top + int(run[0]), top + int(run[-1]) + 1
        pieces.append(_pillow_to_rgb(image.crop((left, first, left + width, last)), source))
    return np.concatenate(pieces)


def _fitted(image: ImageInput, spec: PreprocessingSpec, max_pixels: int) -> np.ndarray:
    return _by_kind(image, max_pixels, lambda array: fit_to_input(_array_to_rgb(array), spec),
                    lambda opened, source: _fit_pillow(opened, spec, source))


def preprocess(image: ImageInput, spec: PreprocessingSpec, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """One image, any supported input, to a float32 H×W×3 model input.

    An encoded image (path or bytes) declaring more than ``max_pixels`` pixels raises
    :class:`ImageTooLarge` before it is decoded; any other failure raises :class:`ImageError`.
    """
    return rescale(_fitted(image, spec, max_pixels), spec.scale, spec.offset)


def preprocess_batch(
    images: Sequence[ImageInput], spec: PreprocessingSpec, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Many images to one float32 (N, H, W, 3) batch; raises :class:`ImageError` naming the first bad one."""
    batch = np.empty((len(images), spec.height, spec.width, spec.channels), dtype=np.float32)
    for index, image in enumerate(images):
        try:
            batch[index] = preprocess(image, spec, max_pixels)
        except ImageError as exc:
            exc.index = index
            raise
    return batch
