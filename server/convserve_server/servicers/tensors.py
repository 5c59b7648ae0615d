"""Decoding tensors from request bytes and values, checked before anything is allocated."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from convserve_server.core import element_count
from convserve_server.errors import InvalidInput

FP32_BYTES = 4


def checked_shape(shape: Sequence[int], what: str, rank: int) -> list[int]:
    """The shape as a list, after checking its rank and that every dimension is positive."""
    dims = list(shape)
    if len(dims) != rank:
        raise InvalidInput(f"{what}: shape must have {rank} dimensions (N, H, W, C), got {dims}")
    element_count(dims)
    return dims


def fp32_from_bytes(data: bytes, shape: Sequence[int], what: str) -> np.ndarray:
    """Little-endian float32 bytes as an array of ``shape``; the byte length must match exactly."""
    expected = element_count(shape) * FP32_BYTES
    if len(data) != expected:
        raise InvalidInput(f"{what}: {len(data)} bytes do not match shape {list(shape)} of FP32 ({expected} bytes)")
    return np.frombuffer(data, dtype="<f4").reshape(shape)


def fp32_from_values(values: Sequence[float], shape: Sequence[int], what: str) -> np.ndarray:
    """Typed float values as an array of ``shape``; the count must match exactly."""
    expected = element_count(shape)
    if len(values) != expected:
        raise InvalidInput(f"{what}: {len(values)} values do not match shape {list(shape)} ({expected} values)")
    return np.asarray(values, dtype=np.float32).reshape(shape)
