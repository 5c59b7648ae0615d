"""The blocking client: images in, labels out."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Literal, Sequence, TypeVar

import grpc

from convserve_client import _wire
from convserve_client.errors import RETRYABLE_CODES, ConvserveError, DeadlineExceededError, ImageError, from_rpc_error
from convserve_client.preprocessing import ImageInput
from convserve_protocol.protos import classifier_pb2, classifier_pb2_grpc, grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from convserve_client.types import Classification, ModelInfo, RetryPolicy

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


class Client:
    """A blocking client for a convserve server.

    ``timeout`` is each RPC's deadline in seconds, its retries included.
    ``credentials`` (``grpc.ssl_channel_credentials(...)``) turns on TLS;
    ``token`` sends a bearer token; ``channel_options`` go to the channel.
    """

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
            self._channel = grpc.insecure_channel(address, options=list(channel_options))
        else:
            self._channel = grpc.secure_channel(address, credentials, options=list(channel_options))
        self._classifier = classifier_pb2_grpc.ClassifierStub(self._channel)
        self._inference = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._model_name = model_name
        self._model_version = model_version
        self._timeout = timeout
        self._retry = retry
        self._max_request_bytes = max_request_bytes
        self._metadata = _wire.auth_metadata(token)
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="convserve-client")
        self._info: ModelInfo | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and the worker threads."""
        self._pool.shutdown(wait=True)
        self._channel.close()

    def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Block until the server says its model is ready; ``DeadlineExceededError`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        request = grpc_predict_v2_pb2.ModelReadyRequest(name=self._model_name, version=self._model_version)
        last_error = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(f"server not ready after {timeout:g} s: {last_error}")
            try:
                ready = self._inference.ModelReady(request, timeout=min(remaining, 1.0), metadata=self._metadata).ready
                if ready:
                    return
                last_error = "model not ready"
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if error.code not in RETRYABLE_CODES | {grpc.StatusCode.DEADLINE_EXCEEDED}:
                    raise error from exc
                last_error = str(error)
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def model_info(self, refresh: bool = False) -> ModelInfo:
        """The served model's labels, input size and preprocessing spec (cached)."""
        if self._info is None or refresh:
            request = classifier_pb2.GetModelInfoRequest(model_name=self._model_name, model_version=self._model_version)
            self._info = _wire.parse_model_info(self._call(self._classifier.GetModelInfo, request))
        return self._info

    def classify(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        top_k: int = 1,
        include_probabilities: bool = False,
        errors: Literal["raise", "return"] = "raise",
    ) -> list[Classification | ImageError]:
        """Classify images of any supported kind; results come back in input order.

        A single image (not in a list) is accepted too.  With ``errors="raise"``
        the first undecodable image raises :class:`ImageError` before anything is
        sent; with ``"return"`` its slot holds the error and the rest are classified.
        """
        info = self.model_info()
        _wire.check_top_k(top_k, len(info.labels))
        prepared = _wire.prepare_images(_wire.as_image_list(images), info.preprocessing)
        first_error = next((slot for slot in prepared.slots if isinstance(slot, ImageError)), None)
        if first_error is not None and errors == "raise":
            raise first_error
        bounds = _wire.chunk_bounds(len(prepared.batch), _wire.rows_per_request(info, self._max_request_bytes))

        def classify_chunk(bound: tuple[int, int]) -> list[Classification]:
            start, stop = bound
            request = _wire.classify_request(
                prepared.batch[start:stop], info.name, self._model_version, top_k, include_probabilities
            )
            return _wire.parse_classify_response(self._call(self._classifier.Classify, request), stop - start)

        results = [row for chunk in self._pool.map(classify_chunk, bounds) for row in chunk]
        return _wire.assemble(prepared.slots, results)

    def _call(self, method: Callable[..., T], request: Any) -> T:
        """One unary call with the deadline and retry policy applied."""
        deadline = time.monotonic() + self._timeout
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(f"no answer within {self._timeout:g} s", grpc.StatusCode.DEADLINE_EXCEEDED)
            try:
                return method(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as exc:
                error: ConvserveError = from_rpc_error(exc)
                if error.code not in RETRYABLE_CODES or attempt >= self._retry.max_attempts:
                    raise error from exc
            time.sleep(min(self._retry.backoff(attempt), max(0.0, deadline - time.monotonic())))

