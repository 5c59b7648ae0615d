"""The one place where domain errors become gRPC status codes, and where requests are admitted and counted."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, Awaitable, Callable, NamedTuple, TypeVar

import grpc
import grpc.aio

from convserve_server.admission import COUNTED_ANSWER_BYTES
from convserve_server.core import InferenceCore
from convserve_server.errors import (
    DeadlineExpired, InvalidInput, ModelLoadFailed, ModelNotFound, ModelNotReady, Overloaded, ServingError,
)
from convserve_server.metrics import ServerMetrics
from convserve_server.servicers.registration import MalformedRequest

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[ServingError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    ModelLoadFailed: grpc.StatusCode.FAILED_PRECONDITION,
}

MAX_MESSAGE_CHARS = 1024
"""Longest status message sent: a message travels in HTTP/2 trailers, which peers cap at a few KiB."""

Response = TypeVar("Response")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]]


def status_code_for(error: ServingError) -> grpc.StatusCode:
    """The gRPC status code of a domain error."""
    for error_type, code in STATUS_BY_ERROR.items():
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


class ServicerBase:
    """What every servicer holds: the core, and the metrics to count requests in."""

    def __init__(self, core: InferenceCore, metrics: ServerMetrics | None) -> None:
        self.core = core
        self.metrics = metrics

    def model_label(self, request: Any) -> str:
        """A bounded metrics label for the request's model: a served name, or "unknown"."""
        name = getattr(request, "model_name", None)
        if name is None:
            name = getattr(request, "name", "")
        if not name:
            name = self.core.default_model
        return name if self.core.serves(name) else "unknown"

    def count(self, request: Any, method: str, code: grpc.StatusCode, started: float) -> None:
        """Count one answered request in the metrics (if any), with its time since ``started``."""
        if self.metrics is not None:
            self.metrics.record_request(self.model_label(request), method, code.name, time.monotonic() - started)


class Failure(NamedTuple):
    """How a request failed: the status code and message it is answered with."""

    code: grpc.StatusCode
    message: str


async def answer(servicer: ServicerBase, method: str, handler: Handler[Response], request: Any,
                 context: grpc.aio.ServicerContext, until_sent: bool = False) -> Response | Failure:
    """Run ``handler`` for one request and count it: its response, or how it failed.

    It runs in one of the core's admission slots (none free: RESOURCE_EXHAUSTED at once) and under the
    shutdown gate. Domain errors become their status codes; anything else is logged and hidden behind INTERNAL.
    With ``until_sent`` (a unary call: the request is the call's only one) the slot of a large answer (one
    :class:`~convserve_server.admission.UnsentAnswers` counts) is held until gRPC has finished the call, its
    answer written, so that large answers a caller does not read count against the limit.  A small answer's
    slot is given back at once: holding it would let a caller that never reads fill every slot with requests
    that cost it nothing (a connection holds at most --max-concurrent-streams small answers, 4 MiB).
    """
    started = time.monotonic()
    admission = servicer.core.admission
    admitted = False
    response: Any = None
    try:
        if isinstance(request, MalformedRequest):
            raise InvalidInput(f"request is not a valid {request.message_type} message: "
                               f"{request.error.rsplit(': ', 1)[-1]}")
        admitted = admission.try_enter()
        if not admitted:
            raise Overloaded(f"server busy: {admission.limit} calls in progress; retry later")
        async with servicer.core.shutdown_gate.call(deadline_of(context)):
            response = await handler(servicer, request, context)
    except ServingError as exc:
        failure = Failure(status_code_for(exc), str(exc)[:MAX_MESSAGE_CHARS])
    except asyncio.CancelledError:
        servicer.count(request, method, grpc.StatusCode.CANCELLED, started)
        raise
    except Exception:
        log.exception("%s failed", method)
        failure = Failure(grpc.StatusCode.INTERNAL, "internal error; see the server log")
    else:
        servicer.count(request, method, grpc.StatusCode.OK, started)
        return response
    finally:
        if admitted:
            if until_sent and response is not None and response.ByteSize() >= COUNTED_ANSWER_BYTES:
                context.add_done_callback(lambda _context: admission.leave())
            else:
                admission.leave()
    # Counted before the status goes out: a caller that reads /metrics once it has its error sees it there.
    servicer.count(request, method, failure.code, started)
    return failure


def rpc(method: str) -> Callable[[Handler[Response]], Handler[Response]]:
    """Wrap a unary servicer method: map domain errors to status codes, hide internal ones, count the request."""

    def decorate(handler: Handler[Response]) -> Handler[Response]:
        @functools.wraps(handler)
        async def wrapper(self: ServicerBase, request: Any, context: grpc.aio.ServicerContext) -> Response:
            result = await answer(self, method, handler, request, context, until_sent=True)
            if isinstance(result, Failure):
                await context.abort(result.code, result.message)
                raise AssertionError("context.abort returned")  # it raises; this line only satisfies type checkers
            return result

        return wrapper

    return decorate


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as a ``time.monotonic()`` instant, if it set one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
