"""The asyncio client: the same calls as :class:`convserve_client.Client`, awaitable."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Literal, Sequence, TypeVar

import grpc
import grpc.aio

from convserve_client import _wire
from convserve_client.client import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_TIMEOUT_S
from convserve_client.errors import RETRYABLE_CODES, ConvserveError, DeadlineExceededError, ImageError, from_rpc_error
from convserve_client.preprocessing import ImageInput
from convserve_protocol.protos import classifier_pb2, classifier_pb2_grpc, grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from convserve_client.types import Classification, ModelInfo, RetryPolicy

T = TypeVar("T")


class AsyncClient:
    """An asyncio client for a convserve server; arguments as for :class:`~convserve_client.Client`."""

    def __init__(
        self,
        address: str,
        *,
        model_name: str = "",
        model_version: str = "",
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy = RetryPolicy(),
        max_in_flight: int = 4,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be an integer >= 1")
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=list(channel_options))
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=list(channel_options))
        self._classifier = classifier_pb2_grpc.ClassifierStub(self._channel)
        self._inference = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._model_name = model_name
        self._model_version = model_version
        self._timeout = timeout
        self._retry = retry
        self._max_in_flight = max_in_flight
        self._max_request_bytes = max_request_bytes
        self._metadata = _wire.auth_metadata(token)
        self._info: ModelInfo | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Wait until the server says its model is ready; ``DeadlineExceededError`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        request = grpc_predict_v2_pb2.ModelReadyRequest(name=self._model_name, version=self._model_version)
        last_error = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(f"server not ready after {timeout:g} s: {last_error}")
            try:
                response = await self._inference.ModelReady(
                    request, timeout=min(remaining, 1.0), metadata=self._metadata
                )
                if response.ready:
                    return
                last_error = "model not ready"
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if error.code not in RETRYABLE_CODES | {grpc.StatusCode.DEADLINE_EXCEEDED}:
                    raise error from exc
                last_error = str(error)
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    async def model_info(self, refresh: bool = False) -> ModelInfo:
        """The served model's labels, input size and preprocessing spec (cached)."""
        if self._info is None or refresh:
            request = classifier_pb2.GetModelInfoRequest(model_name=self._model_name, model_version=self._model_version)
            self._info = _wire.parse_model_info(await self._call(self._classifier.GetModelInfo, request))
        return self._info

    async def classify(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        top_k: int = 1,
        include_probabilities: bool = False,
        errors: Literal["raise", "return"] = "raise",
    ) -> list[Classification | ImageError]:
        """Classify images of any supported kind; see :meth:`convserve_client.Client.classify`."""
        info = await self.model_info()
        _wire.check_top_k(top_k, len(info.labels))
        prepared = _wire.prepare_images(_wire.as_image_list(images), info.preprocessing)
        first_error = next((slot for slot in prepared.slots if isinstance(slot, ImageError)), None)
        if first_error is not None and errors == "raise":
            raise first_error
        bounds = _wire.chunk_bounds(len(prepared.batch), _wire.rows_per_request(info, self._max_request_bytes))
        in_flight = asyncio.Semaphore(self._max_in_flight)

        async def classify_chunk(start: int, stop: int) -> list[Classification]:
            request = _wire.classify_request(
                prepared.batch[start:stop], info.name, self._model_version, top_k, include_probabilities
            )
            async with in_flight:
                response = await self._call(self._classifier.Classify, request)
            return _wire.parse_classify_response(response, stop - start)

        chunks = await asyncio.gather(*(classify_chunk(start, stop) for start, stop in bounds))
        return _wire.assemble(prepared.slots, [row for chunk in chunks for row in chunk])

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        """One unary call with the deadline and retry policy applied."""
        deadline = time.monotonic() + self._timeout
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(f"no answer within {self._timeout:g} s", grpc.StatusCode.DEADLINE_EXCEEDED)
            try:
                return await method(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as exc:
                error: ConvserveError = from_rpc_error(exc)
                if error.code not in RETRYABLE_CODES or attempt >= self._retry.max_attempts:
                    raise error from exc
            await asyncio.sleep(min(self._retry.backoff(attempt), max(0.0, deadline - time.monotonic())))
