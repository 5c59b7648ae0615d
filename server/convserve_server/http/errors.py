"""The one place where domain errors and HTTP's own refusals become HTTP statuses and ``{"error": ...}`` bodies.

A domain error's HTTP status is chosen here; the code name it is counted under in the metrics is gRPC's, taken
from :mod:`convserve_server.servicers.status`, so that one error counts the same over both protocols.
"""

from __future__ import annotations

from typing import NamedTuple

from convserve_server.errors import (
    DeadlineExpired, InvalidInput, ModelLoadFailed, ModelNotFound, ModelNotReady, Overloaded, ServingError,
)
from convserve_server.servicers.status import MAX_MESSAGE_CHARS, status_code_for


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
CLIENT_CLOSED = Status(499, "CANCELLED")
"""The caller disconnected before its answer (nginx's 499): counted, never sent."""
INTERNAL = Status(500, "INTERNAL")
UNAVAILABLE = Status(503, "UNAVAILABLE")

HTTP_STATUS_BY_ERROR: dict[type[ServingError], int] = {
    InvalidInput: 400,
    ModelNotFound: 404,
    ModelNotReady: 503,
    Overloaded: 429,
    DeadlineExpired: 504,
    ModelLoadFailed: 400,  # gRPC's FAILED_PRECONDITION, which HTTP gateways answer with 400
}
"""The HTTP status of each domain error (its metrics code is gRPC's: :func:`status_for`)."""


class HttpError(Exception):
    """A refusal of HTTP's own (size, encoding, token, method): its status and the message for the caller."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


def status_for(error: Exception) -> Status:
    """The status of a domain error or an :class:`HttpError`; INTERNAL for anything else."""
    if isinstance(error, HttpError):
        return error.status
    if isinstance(error, ServingError):
        for error_type, http in HTTP_STATUS_BY_ERROR.items():
            if isinstance(error, error_type):
                return Status(http, status_code_for(error).name)
    return INTERNAL


def message_for(error: Exception) -> str:
    """What the caller reads: the error's own message, cut short; internal errors are not described."""
    if status_for(error) is INTERNAL:
        return "internal error; see the server log"
    return str(error)[:MAX_MESSAGE_CHARS]
