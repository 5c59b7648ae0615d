"""Golden vectors: inputs a model file carries with the probabilities it must give for them.

The exporter (or ``convserve-golden``) records a few preprocessed images and
the reference probabilities for each; a server runs them on its own execution
provider before serving the file and compares (largest absolute difference).

In the ONNX metadata they are one JSON value under ``convserve.golden``: the
arrays as base64 of zlib-compressed little-endian float32, their shapes, and
the tolerance.  For eight 28×28×3 images that is a few tens of KB.

Reading them never inflates more than their declared shapes: zlib's output is capped at the bytes
an array's shape declares (itself capped at :data:`MAX_GOLDEN_BYTES`, and, read with a model card,
checked against the card's input size and labels first), so a model file or a card whose vectors
inflate to gigabytes is refused after inflating a few hundred bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import zlib
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

GOLDEN_KEY = "convserve.golden"
"""The metadata key that holds the golden vectors."""

DEFAULT_TOLERANCE = 1e-4
DEFAULT_COUNT = 8
"""Golden vectors an exporter records unless told otherwise."""
"""Largest absolute probability difference a server accepts by default."""

MAX_GOLDEN_BYTES = 64 * 1024 * 1024
"""Most bytes one golden array may declare (inputs or probabilities): 8 images of 224×224×3 take 4.8 MB."""

_FORMAT = 1
_DTYPE = "<f4"


@dataclass(frozen=True, eq=False)
class GoldenVectors:
    """Preprocessed inputs (N, H, W, C) and the probabilities (N, classes) a correct model gives for them."""

    inputs: np.ndarray
    """Preprocessed images, float32 (N, H, W, C)."""
    probabilities: np.ndarray
    """Reference probabilities, float32 (N, classes)."""
    tolerance: float = DEFAULT_TOLERANCE
    """Largest absolute difference from ``probabilities`` that still counts as a match."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", np.ascontiguousarray(self.inputs, dtype=np.float32))
        object.__setattr__(self, "probabilities", np.ascontiguousarray(self.probabilities, dtype=np.float32))
        if self.inputs.ndim != 4 or self.probabilities.ndim != 2:
            raise ValueError(f"golden vectors need inputs (N, H, W, C) and probabilities (N, classes), got "
                             f"{self.inputs.shape} and {self.probabilities.shape}")
        if len(self.inputs) == 0 or len(self.inputs) != len(self.probabilities):
            raise ValueError(f"golden vectors need as many probability rows as inputs (at least one), got "
                             f"{len(self.inputs)} inputs and {len(self.probabilities)} rows")
        if not (np.isfinite(self.inputs).all() and np.isfinite(self.probabilities).all()):
            raise ValueError("golden vectors contain NaN or infinity")
        if not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise ValueError(f"golden tolerance must be a positive number, got {self.tolerance!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GoldenVectors):
            return NotImplemented
        return (self.tolerance == other.tolerance and np.array_equal(self.inputs, other.inputs)
                and np.array_equal(self.probabilities, other.probabilities))

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    @property
    def count(self) -> int:
        """Number of golden inputs."""
        return len(self.inputs)

    def check_fits(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        """``ValueError`` unless the inputs are images of ``input_shape`` and the rows have ``num_classes``."""
        if tuple(self.inputs.shape[1:]) != tuple(input_shape) or self.probabilities.shape[1] != num_classes:
            raise ValueError(f"golden vectors hold {self.inputs.shape[1:]} inputs and {self.probabilities.shape[1]} "
                             f"classes; the model takes {tuple(input_shape)} and has {num_classes}")

    def worst_difference(self, probabilities: np.ndarray) -> float:
        """Largest absolute difference between ``probabilities`` and the recorded ones (inf on a shape mismatch)."""
        if probabilities.shape != self.probabilities.shape:
            return math.inf
        difference = float(np.max(np.abs(probabilities.astype(np.float32) - self.probabilities)))
        return difference if math.isfinite(difference) else math.inf

    def to_metadata(self) -> dict[str, str]:
        """The vectors as ONNX ``metadata_props`` entries."""
        value = {
            "format": _FORMAT,
            "tolerance": self.tolerance,
            "inputs_shape": list(self.inputs.shape),
            "probabilities_shape": list(self.probabilities.shape),
            "inputs": _encode(self.inputs),
            "probabilities": _encode(self.probabilities),
        }
        return {GOLDEN_KEY: json.dumps(value, sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], input_shape: tuple[int, ...] | None = None,
                      num_classes: int | None = None) -> GoldenVectors | None:
        """The vectors in ``metadata``, or None if it has none; ``ValueError`` if they are malformed.

        With ``input_shape`` and ``num_classes`` (a model card's), declared shapes that do not fit them are
        refused before anything is decompressed.
        """
        text = metadata.get(GOLDEN_KEY)
        if text is None:
            return None
        try:
            value: dict[str, Any] = json.loads(text)
            if not isinstance(value, dict) or value.get("format") != _FORMAT:
                raise ValueError(f"unsupported format {value.get('format') if isinstance(value, dict) else value!r}")
            inputs_shape, probabilities_shape = value["inputs_shape"], value["probabilities_shape"]
            if input_shape is not None and num_classes is not None:
                _check_declared_fit(inputs_shape, probabilities_shape, input_shape, num_classes)
            return cls(
                inputs=_decode(value["inputs"], inputs_shape),
                probabilities=_decode(value["probabilities"], probabilities_shape),
                tolerance=float(value["tolerance"]),
            )
        except (KeyError, TypeError, ValueError, binascii.Error, zlib.error) as exc:
            detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"model metadata {GOLDEN_KEY!r} is malformed: {detail}") from exc


def _encode(array: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(array.astype(_DTYPE).tobytes(), 9)).decode("ascii")


def _check_declared_fit(inputs_shape: Any, probabilities_shape: Any, input_shape: tuple[int, ...],
                       num_classes: int) -> None:
    """Refuse declared shapes that cannot be a card's golden vectors, before decompressing anything."""
    if (not isinstance(inputs_shape, list) or not isinstance(probabilities_shape, list) or len(inputs_shape) != 4
            or len(probabilities_shape) != 2 or inputs_shape[1:] != list(input_shape)
            or probabilities_shape[1:] != [num_classes] or inputs_shape[0] != probabilities_shape[0]):
        raise ValueError(f"declared shapes {inputs_shape!r} and {probabilities_shape!r} do not fit the model's "
                         f"(N, {', '.join(map(str, input_shape))}) inputs and (N, {num_classes}) probabilities")


def _decode(text: str, shape: list[int]) -> np.ndarray:
    if not isinstance(shape, list) or not all(isinstance(dim, int) and dim >= 0 for dim in shape):
        raise ValueError(f"bad shape {shape!r}")
    expected = math.prod(shape) * np.dtype(_DTYPE).itemsize
    if expected > MAX_GOLDEN_BYTES:
        raise ValueError(f"shape {shape} declares {expected} bytes of float32, more than the {MAX_GOLDEN_BYTES} "
                         "bytes golden vectors may hold")
    data = _inflate_at_most(base64.b64decode(text, validate=True), expected, shape)
    return np.frombuffer(data, dtype=_DTYPE).reshape(shape).astype(np.float32)


def _inflate_at_most(compressed: bytes, expected: int, shape: list[int]) -> bytes:
    """Exactly ``expected`` bytes from a zlib stream, never inflating more than ``expected`` + 1 of them:
    ``ValueError`` if it would inflate past them (a compression bomb), ends short, or is followed by more."""
    inflater = zlib.decompressobj()
    data = inflater.decompress(compressed, expected + 1)  # stops at the cap, else has consumed all the input
    if len(data) > expected:
        raise ValueError(f"the data inflates to more than the {expected} bytes shape {shape} of float32 declares "
                         "(a compression bomb?); refused before inflating the rest")
    if not inflater.eof or len(data) != expected:
        raise ValueError(f"{len(data)} bytes do not match shape {shape} of float32 ({expected} bytes)")
    if inflater.unused_data:
        raise ValueError("data follows the end of the compressed stream")
    return data
