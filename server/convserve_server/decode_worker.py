"""Decoding one request's encoded images, and the loop a decode process runs.

:func:`decode_request` is the whole job: every image's header is read first (each image's size, and
the request's total, are checked before a pixel is decoded), then each image is decoded and fitted
with the contract's preprocessing, the same code the client SDK and training run.  The server runs it
in a decode process (:func:`serve`), where a decode past its time can be stopped by killing the
process; small plain PNGs take it on a thread of the server itself.  Nothing here knows gRPC.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing.connection
import resource
import signal
import sys
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from convserve_protocol.preprocessing import (
    ImageError, ImageTooLarge, decode_opened, describe_source, open_header, preprocess,
)
from convserve_protocol.preprocessing_spec import PreprocessingSpec
from convserve_server.errors import InvalidInput

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class DecodeJob:
    """One request's images and the limits they are decoded under."""

    encoded: list[bytes]
    spec: PreprocessingSpec
    formats: tuple[str, ...]
    max_image_pixels: int
    max_request_pixels: int


@dataclass(frozen=True)
class DecodeRefused:
    """A decode process's answer when the images are refused: the caller's INVALID_ARGUMENT message."""

    message: str


def decode_request(job: DecodeJob) -> np.ndarray:
    """The (N, H, W, C) float32 model input of ``job``; InvalidInput names a bad image by its index."""
    _check_declared_pixels(job)
    spec = job.spec
    batch = np.empty((len(job.encoded), spec.height, spec.width, spec.channels), dtype=np.float32)
    for index, data in enumerate(job.encoded):
        with _naming_image(index):
            source = describe_source(data)
            image = decode_opened(open_header(data, source, job.max_image_pixels, job.formats), source)
            try:
                batch[index] = preprocess(image, spec)
            finally:
                image.close()
    return batch


def _check_declared_pixels(job: DecodeJob) -> None:
    """Read every header and refuse a request whose images declare more pixels in all than allowed.

    An image whose header is bad, or over the per-image limit, is left for the decoding loop to refuse,
    so that the first bad image of a request is the one named, as when decoding in order.
    """
    total = 0
    for data in job.encoded:
        try:
            opened = open_header(data, describe_source(data), job.max_image_pixels, job.formats)
        except (ImageError, MemoryError):
            continue
        total += opened.width * opened.height
        opened.close()
    if total > job.max_request_pixels:
        raise InvalidInput(f"encoded_images: {len(job.encoded)} images declare {total:,} pixels in all, over the "
                           f"limit of {job.max_request_pixels:,} pixels per request (--max-request-pixels)")


@contextlib.contextmanager
def _naming_image(index: int) -> Iterator[None]:
    """Turn an image's decoding errors into InvalidInput naming its index and, where one applies, the limit."""
    prefix = f"encoded_images[{index}]: "
    try:
        yield
    except ImageTooLarge as exc:
        raise InvalidInput(f"{prefix}{exc} (--max-image-pixels)") from None
    except ImageError as exc:
        raise InvalidInput(f"{prefix}{exc}") from None
    except MemoryError:
        raise InvalidInput(f"{prefix}decoding it needs more memory than a decode process may use "
                           "(see --max-image-pixels)") from None


# --- the decode process ------------------------------------------------------------------------


def serve(connection: multiprocessing.connection.Connection, memory_budget_bytes: int) -> None:
    """A decode process: answer each :class:`DecodeJob` received with its batch or a :class:`DecodeRefused`,
    until the server closes the connection (or kills the process).

    Its address space may grow by ``memory_budget_bytes`` (0: unlimited) beyond what it has at the start.
    """
    _die_with_parent()
    if memory_budget_bytes > 0:
        _limit_memory(_address_space_bytes() + memory_budget_bytes)
    _quiet_pillow()
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):
            return
        try:
            answer: np.ndarray | DecodeRefused = decode_request(job)
        except InvalidInput as exc:
            answer = DecodeRefused(str(exc))
        connection.send(answer)


def _die_with_parent() -> None:
    """Be killed when the process that started this one dies, even by SIGKILL: no decode outlives the server."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _limit_memory(limit_bytes: int) -> None:
    """Cap the address space: past it, allocations fail (MemoryError) instead of the host running out."""
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))


def _quiet_pillow() -> None:
    """Pillow's log lines and warnings about a caller's malformed image stay out of the server's output; the
    caller is told the reason instead (as in the server process, see ``convserve_server.cli``)."""
    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"PIL\.")


def _address_space_bytes() -> int:
    """This process's current virtual memory size (VmSize), the base a decode process's limit is added to."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmSize line")
