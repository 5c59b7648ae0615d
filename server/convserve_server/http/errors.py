"""The one place where domain errors and HTTP's own refusals become HTTP statuses and ``{"error": ...}`` bodies.

It mirrors :mod:`convserve_server.servicers.status` (the gRPC mapping) error for error, and names each answer
with the canonical status code name too, so that HTTP and gRPC requests are counted in the same metrics.
"""

from __future__ import annotations

from typing import NamedTuple

from convserve_server.errors import (
    DeadlineExpired, InvalidInput, ModelLoadFailed, ModelNotFound, ModelNotReady, Overloaded, ServingError,
)

MAX_MESSAGE_CHARS = 1024
"""Longest error message sent, as over gRPC."""


class Status(NamedTuple):
    """An HTTP status and the canonical (gRPC) code name it is counted under."""

    http: int
    code: str


OK = Status(200, "OK")
BAD_REQUEST = Status(400, "INVALID_ARGUMENT")
UNAUTHENTICATED = Status(401, "UNAUTHENTICATED")
FORBIDDEN = Status(403, "PERMISSION_DENIED")
NOT_FOUND = Status(404, "NOT_FOUND")
METHOD_NOT_ALLOWED = Status(405, "UNIMPLEMENTED")
REQUEST_TIMEOUT = Status(408, "DEADLINE_EXCEEDED")
TOO_LARGE = Status(413, "RESOURCE_EXHAUSTED")
UNSUPPORTED_MEDIA = Status(415, "INVALID_ARGUMENT")
TOO_MANY_REQUESTS = Status(429, "RESOURCE_EXHAUSTED")
INTERNAL = Status(500, "INTERNAL")
UNAVAILABLE = Status(503, "UNAVAILABLE")
GATEWAY_TIMEOUT = Status(504, "DEADLINE_EXCEEDED")

STATUS_BY_ERROR: dict[type[ServingError], Status] = {
    InvalidInput: BAD_REQUEST,
    ModelNotFound: NOT_FOUND,
    ModelNotReady: UNAVAILABLE,
    Overloaded: TOO_MANY_REQUESTS,
    DeadlineExpired: GATEWAY_TIMEOUT,
    ModelLoadFailed: BAD_REQUEST,  # gRPC's FAILED_PRECONDITION, which HTTP gateways answer with 400
}


class HttpError(Exception):
    """A refusal of HTTP's own (size, encoding, token, method): its status and the message for the caller."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


def status_for(error: Exception) -> Status:
    """The status of a domain error or an :class:`HttpError`; INTERNAL for anything else."""
    if isinstance(error, HttpError):
        return error.status
    for error_type, status in STATUS_BY_ERROR.items():
        if isinstance(error, error_type):
            return status
    return INTERNAL


def message_for(error: Exception) -> str:
    """What the caller reads: the error's own message, cut short; internal errors are not described."""
    if status_for(error) is INTERNAL:
        return "internal error; see the server log"
    return str(error)[:MAX_MESSAGE_CHARS]
