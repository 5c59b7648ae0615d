"""Encoded images of a Classify request: checked against the limits, then decoded and preprocessed off the loop.

The pixels come from the contract's preprocessing (:mod:`convserve_protocol.preprocessing`), the very code
that the client SDK and training apply, so sending files gives exactly the probabilities of sending the
client-preprocessed tensor.  Nothing here knows gRPC.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from convserve_protocol.preprocessing import ImageError, ImageTooLarge, preprocess_batch
from convserve_protocol.preprocessing_spec import PreprocessingSpec
from convserve_server.config import ServerConfig
from convserve_server.errors import InvalidInput

FP32_BYTES = 4


class ImageDecoder:
    """Turns a request's encoded images into one preprocessed float32 batch, on its own threads."""

    def __init__(self, config: ServerConfig) -> None:
        self._max_image_bytes = config.max_image_bytes
        self._max_request_bytes = config.max_encoded_request_bytes
        self._max_pixels = config.max_image_pixels
        self._max_batch_bytes = config.max_message_bytes
        self._executor = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="decode")

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

    async def preprocess(self, encoded: Sequence[bytes], spec: PreprocessingSpec) -> np.ndarray:
        """The (N, H, W, C) float32 model input of ``encoded``; InvalidInput names a bad image by its index."""
        if not encoded:
            raise InvalidInput("encoded_images: empty batch: send at least one image")
        self.check_sizes(encoded, spec)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._preprocess_on_thread, list(encoded), spec)

    def _preprocess_on_thread(self, encoded: list[bytes], spec: PreprocessingSpec) -> np.ndarray:
        try:
            return preprocess_batch(encoded, spec, self._max_pixels)
        except ImageTooLarge as exc:
            raise InvalidInput(f"encoded_images[{exc.index}]: {exc} (--max-image-pixels)") from None
        except ImageError as exc:
            raise InvalidInput(f"encoded_images[{exc.index}]: {exc}") from None

    def close(self) -> None:
        """Let the decodes under way finish, and start no more."""
        self._executor.shutdown(wait=False)
