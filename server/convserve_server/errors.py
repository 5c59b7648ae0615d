"""Domain errors of the server core.  They know nothing of gRPC: ``servicers.status`` maps them."""

from __future__ import annotations


MAX_QUOTED_CHARS = 64
"""Most characters of a caller's string an error message repeats."""


def quoted(text: str) -> str:
    """A caller's string for an error message: repr'd, and cut short if long, so messages stay small."""
    if len(text) <= MAX_QUOTED_CHARS:
        return repr(text)
    return f"{text[:MAX_QUOTED_CHARS]!r}... ({len(text)} characters)"


class ServingError(Exception):
    """Base of the errors a request can end with; the message goes to the caller."""


class InvalidInput(ServingError):
    """The request is malformed: shape, dtype, byte length, values."""


class ModelNotFound(ServingError):
    """No such model, version or output."""


class ModelNotReady(ServingError):
    """The server or model is not ready, or is draining."""


class Overloaded(ServingError):
    """The queue is full; the caller should retry later."""


class DeadlineExpired(ServingError):
    """The caller's deadline passed before the request was computed."""


class ModelLoadFailed(ServingError):
    """A model of the repository could not be loaded or warmed up; what was served stays served."""


class StartupError(Exception):
    """The server cannot start: a missing or corrupt model, or an unusable device."""
