"""Encoded images of a Classify request: checked against the limits, then decoded and preprocessed off the loop.

The pixels come from the contract's preprocessing (:mod:`convserve_protocol.preprocessing`), the very code
that the client SDK and training apply, so sending files gives exactly the probabilities of sending the
client-preprocessed tensor.  Nothing here knows gRPC.

Where a request's images decode (docs/operations.md, "Encoded images", has the figures):

- a request of small plain PNGs (no compressed or EXIF chunks before the pixels; few pixels and bytes in
  all) decodes on a thread of the server: its cost is bounded by its size, and a hand-off to a process
  would cost more than the decode;
- every other request decodes in a decode process (:mod:`convserve_server.decode_pool`), within
  ``--decode-timeout-s`` and the caller's deadline; past either, or when the call is cancelled or the
  server stops, the process is killed.

Only the formats of :data:`~convserve_server.image_formats.ACCEPTED_FORMATS` are decoded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol, Sequence, TypeVar

import numpy as np

from convserve_protocol.preprocessing import describe_source
from convserve_protocol.preprocessing_spec import PreprocessingSpec
from convserve_server.config import ServerConfig
from convserve_server.decode_pool import DecodePool, DecodeProcessDied, DecodeTimeout, PoolClosed
from convserve_server.decode_worker import DecodeJob, DecodeRefused, decode_request
from convserve_server.errors import DeadlineExpired, InvalidInput, ModelNotReady
from convserve_server.image_formats import ACCEPTED_FORMATS, load_plugins, png_header, sniff_format

class Preprocessed(Protocol):
    """What images are decoded for: a served version, through its preprocessing spec."""

    @property
    def preprocessing(self) -> PreprocessingSpec:
        """How the version's images are cropped, resized and scaled."""


Served = TypeVar("Served", bound=Preprocessed)
Result = TypeVar("Result")
MAX_DECODES = 3
"""Most times one request's images are decoded, when hot swaps change the model's preprocessing meanwhile."""

log = logging.getLogger(__name__)

FP32_BYTES = 4

FAST_PATH_MAX_PIXELS = 1_048_576
"""Most pixels (all images together) of a request of plain PNGs decoded on a server thread.  Such PNGs
decode in time proportional to their pixels: 512×512 of RGB noise takes 5 ms on the development machine,
a megapixel 16 ms.  The thread keeps them clear of the decode processes, which hostile images may hold
for up to ``--decode-timeout-s``; a decode process would cost about 0.2 ms more per request than a thread."""

FAST_PATH_MAX_BYTES = 1_048_576
"""Most encoded bytes (all images together) of a request decoded on a server thread."""

DECODE_BYTES_PER_PIXEL = 12
"""Memory a decode process may take per pixel of ``--max-image-pixels`` (its address-space limit): Pillow
holds an image in up to 4 bytes a pixel, a progressive JPEG's coefficients take up to 6 more while it
decodes, and an EXIF rotation makes a second copy of the 4."""

DECODE_MEMORY_SLACK_BYTES = 256 * 1024 * 1024
"""Address space a decode process may take beyond the per-pixel budget: the decoders' own tables and
buffers, and the request's images and answer."""


def decode_memory_budget(max_image_pixels: int) -> int:
    """How far a decode process's address space may grow: enough for the largest image allowed."""
    return DECODE_BYTES_PER_PIXEL * max_image_pixels + DECODE_MEMORY_SLACK_BYTES


class ImageDecoder:
    """Turns a request's encoded images into one preprocessed float32 batch, off the event loop."""

    def __init__(self, config: ServerConfig) -> None:
        self._max_image_bytes = config.max_image_bytes
        self._max_request_bytes = config.max_encoded_request_bytes
        self._max_pixels = config.max_image_pixels
        self._max_request_pixels = config.max_request_pixels
        self._max_batch_bytes = config.max_message_bytes
        self._time_limit_s = config.decode_timeout_s
        self._threads = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="decode")
        self._processes = DecodePool(config.decode_processes, decode_memory_budget(config.max_image_pixels))
        self._plugins_loaded = False
        self._closed = False

    def check_sizes(self, encoded: Sequence[bytes], spec: PreprocessingSpec) -> None:
        """Refuse, before any decoding, a request whose bytes or decoded batch exceed the limits."""
        for index, image in enumerate(encoded):
            if len(image) > self._max_image_bytes:
                raise InvalidInput(f"encoded_images[{index}]: {len(image):,} bytes, over the limit of "
                                   f"{self._max_image_bytes:,} bytes per image (--max-image-bytes)")
        total = sum(len(image) for image in encoded)
        if total > self._max_request_bytes:
            raise InvalidInput(f"encoded_images: {total:,} bytes in all, over the limit of "
                               f"{self._max_request_bytes:,} bytes per request (--max-encoded-request-bytes)")
        batch_bytes = len(encoded) * spec.height * spec.width * spec.channels * FP32_BYTES
        if batch_bytes > self._max_batch_bytes:
            raise InvalidInput(f"encoded_images: {len(encoded)} images make {batch_bytes:,} bytes of model input, "
                               f"over the {self._max_batch_bytes:,} a tensor request may carry "
                               "(--max-message-bytes); send fewer per request")

    async def preprocess_for_current(self, resolve: Callable[[], Served], encoded: Sequence[bytes],
                                     deadline: float | None = None) -> tuple[Served, np.ndarray]:
        """The version ``resolve()`` names once ``encoded`` is decoded, and the images preprocessed for it.

        The version is chosen again after the decode, so that a hot swap meanwhile answers the call with the
        new version rather than failing it on the retired one; if the new version preprocesses differently,
        the images are decoded again with its spec, at most :data:`MAX_DECODES` times.
        """
        served = resolve()
        for _ in range(MAX_DECODES):
            spec = served.preprocessing
            images = await self.preprocess(encoded, spec, deadline)
            served = resolve()
            if served.preprocessing == spec:
                return served, images
        raise ModelNotReady(f"the model changed its preprocessing {MAX_DECODES} times while the images decoded; "
                            "try again")

    async def preprocess(self, encoded: Sequence[bytes], spec: PreprocessingSpec,
                         deadline: float | None = None) -> np.ndarray:
        """The (N, H, W, C) float32 model input of ``encoded``; InvalidInput names a bad image by its index.

        ``deadline`` (a ``time.monotonic()`` instant, the caller's) ends the decode with DeadlineExpired;
        a decode past ``--decode-timeout-s`` is InvalidInput.  Either way, and if the awaiting call is
        cancelled, the decoding stops.
        """
        if not encoded:
            raise InvalidInput("encoded_images: empty batch: send at least one image")
        self.check_sizes(encoded, spec)
        if self._closed:
            raise ModelNotReady("server is shutting down; not decoding images")
        if not self._plugins_loaded:  # importing Pillow's plugins would stall the event loop
            await self._on_a_thread(load_plugins)
            self._plugins_loaded = True
        check_formats(encoded)
        if takes_fast_path(encoded):
            job = DecodeJob(list(encoded), spec, ("PNG",), self._max_pixels, self._max_request_pixels)
            return await self._on_a_thread(decode_request, job)
        job = DecodeJob(list(encoded), spec, ACCEPTED_FORMATS, self._max_pixels, self._max_request_pixels)
        return await self._in_a_process(job, math.inf if deadline is None else deadline)

    def _on_a_thread(self, function: Callable[..., Result], *args: object) -> asyncio.Future[Result]:
        """``function(*args)`` on a decode thread; ModelNotReady once :meth:`close` shut the threads down (a
        call that was awaiting something else meanwhile gets there)."""
        try:
            return asyncio.get_running_loop().run_in_executor(self._threads, function, *args)
        except RuntimeError:  # "cannot schedule new futures after shutdown"
            if not self._closed:
                raise
            raise ModelNotReady("server is shutting down; not decoding images") from None

    async def _in_a_process(self, job: DecodeJob, deadline: float) -> np.ndarray:
        if time.monotonic() >= deadline:
            raise DeadlineExpired("the deadline passed before the images were decoded")
        try:
            answer = await self._processes.run(job, self._time_limit_s, deadline)
        except DecodeTimeout:
            if time.monotonic() >= deadline:
                raise DeadlineExpired("the deadline passed while the images were decoding; decoding stopped") from None
            raise InvalidInput(f"encoded_images: decoding took longer than {self._time_limit_s:g} s, the limit per "
                               "request (--decode-timeout-s); decoding stopped") from None
        except PoolClosed:
            raise ModelNotReady("server is shutting down; decoding stopped") from None
        except DecodeProcessDied:
            log.warning("a decode process died on a request's images; it is replaced")
            raise InvalidInput("encoded_images: the decoder ended without decoding these images") from None
        if isinstance(answer, DecodeRefused):
            raise InvalidInput(answer.message)
        assert isinstance(answer, np.ndarray), type(answer)
        return answer

    def decode_process_ids(self) -> list[int]:
        """Process ids of the decode processes running now (for operators' tools and tests)."""
        return self._processes.pids()

    def close(self) -> None:
        """Stop every decode now (their callers get UNAVAILABLE), and start no more."""
        self._closed = True
        self._processes.close()
        self._threads.shutdown(wait=False)


def check_formats(encoded: Sequence[bytes]) -> None:
    """Refuse an image whose magic bytes are those of a format Pillow knows but the server does not accept,
    naming it.  Bytes of no known format go on to the decoder, which calls them unrecognised."""
    for index, image in enumerate(encoded):
        found = sniff_format(image)
        if found is not None and found not in ACCEPTED_FORMATS:
            raise InvalidInput(f"encoded_images[{index}]: {describe_source(image)}: {found} images are not "
                               f"accepted; send {', '.join(ACCEPTED_FORMATS[:-1])} or {ACCEPTED_FORMATS[-1]}")


def takes_fast_path(encoded: Sequence[bytes]) -> bool:
    """Whether a request's images all are plain PNGs, with few bytes and pixels in all (decoded in process)."""
    if sum(len(image) for image in encoded) > FAST_PATH_MAX_BYTES:
        return False
    pixels = 0
    for image in encoded:
        header = png_header(image)
        if header is None or not header.plain:
            return False
        pixels += header.width * header.height
    return pixels <= FAST_PATH_MAX_PIXELS
