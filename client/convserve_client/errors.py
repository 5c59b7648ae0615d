"""The client's exceptions: each keeps the gRPC status code and the server's message."""

from __future__ import annotations

import re

import grpc

from convserve_protocol import preprocessing as _preprocessing


class ConvserveError(Exception):
    """Base of every error the SDK raises."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message if self.code is None else f"{self.code.name}: {self.message}"


class InvalidArgumentError(ConvserveError):
    """The server rejected the request's content (INVALID_ARGUMENT)."""


class NotFoundError(ConvserveError):
    """Unknown model, version or output (NOT_FOUND)."""


class UnavailableError(ConvserveError):
    """The server is down, not ready or draining (UNAVAILABLE); retried before it is raised."""


class OverloadedError(ConvserveError):
    """The server's queue is full (RESOURCE_EXHAUSTED); retried before it is raised."""


class MessageTooLargeError(ConvserveError):
    """A message was larger than gRPC allows (RESOURCE_EXHAUSTED "larger than max"); not retried as it is."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message, code)
        match = _LARGER_THAN_MAX.search(message)
        self.limit: int | None = int(match.group(2)) if match else None
        """The largest message the refusing side accepts, when its message says so."""


class DeadlineExceededError(ConvserveError):
    """The call ran out of time (DEADLINE_EXCEEDED)."""


class AuthenticationError(ConvserveError):
    """Missing or wrong credentials (UNAUTHENTICATED or PERMISSION_DENIED)."""


class ServerError(ConvserveError):
    """Any other status the server answered with."""


class ImageError(ConvserveError, _preprocessing.ImageError):
    """An input image could not be read or decoded; names the image (the contract's error, as the SDK's)."""

    def __init__(self, message: str, source: str, index: int | None = None) -> None:
        _preprocessing.ImageError.__init__(self, message, source, index)  # ConvserveError's would pass only message
        self.code = None


_BY_CODE: dict[grpc.StatusCode, type[ConvserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
}

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
"""Status codes worth another try: the request itself was fine."""


_LARGER_THAN_MAX = re.compile(r"larger than max \((\d+) vs\. (\d+)\)")
"""gRPC's words for a message over the limit: ``Received message larger than max (SIZE vs. LIMIT)``."""


PLAINTEXT_TO_TLS_HINT = "the server closed the connection before answering: it probably expects TLS"
"""What a plaintext client is told when a server that expects TLS hangs up on it."""
TLS_TO_PLAINTEXT_HINT = "the server did not answer the TLS handshake: it probably does not use TLS"
"""What a TLS client is told when the server answers its handshake in plaintext."""


def connection_hint(message: str) -> str | None:
    """What gRPC's words for a failed connection most likely mean, when they are about TLS.

    A TLS server hangs up on a plaintext client without a word (gRPC says ``Socket closed``), and a plaintext
    server answers a TLS handshake with bytes that are not TLS (``WRONG_VERSION_NUMBER``).
    """
    lowered = message.lower()
    if "failed to connect" not in lowered:
        return None
    if "handshake failed" in lowered and "wrong_version_number" in lowered:
        return TLS_TO_PLAINTEXT_HINT
    if "socket closed" in lowered:
        return PLAINTEXT_TO_TLS_HINT
    return None


def from_rpc_error(error: grpc.RpcError) -> ConvserveError:
    """Translate a ``grpc.RpcError`` into the matching :class:`ConvserveError` (with a word on TLS where a
    failed connection looks like a client and a server that disagree about it)."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    cls = _BY_CODE.get(code, ServerError) if code is not None else ServerError
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        cls = MessageTooLargeError
    if code == grpc.StatusCode.UNAVAILABLE and (hint := connection_hint(details)) is not None:
        details = f"{details} ({hint})"
    return cls(details, code)


def is_retryable(error: ConvserveError) -> bool:
    """Whether the same request is worth another try: the server was down or busy, the request was fine."""
    return error.code in RETRYABLE_CODES and not isinstance(error, MessageTooLargeError)
