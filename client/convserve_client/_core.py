"""The clients' logic without their I/O: what to call, when to wait, and what the answers mean.

A *plan* is a generator.  It yields :class:`Rpc` (make this call and send me its response, or the
``grpc.RpcError`` it raised) and :class:`Pause` (wait this long and send me ``None``), and returns its
result.  :class:`~convserve_client.Client` carries the steps out with blocking calls and
:class:`~convserve_client.AsyncClient` with awaits; that is all that differs between them.

The retry schedule (:func:`call`) is the SDK's one retry layer: gRPC's own ``retryPolicy`` is not
configured, so attempts never stack.  Each attempt is a new call, so with several replicas the
round-robin balancer picks it a replica afresh, and one that failed (closed, draining) is no longer
among those it picks from.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Generic, Literal, NamedTuple, Sequence, TypeVar

import grpc

from convserve_client import _wire
from convserve_client.errors import RETRYABLE_CODES, DeadlineExceededError, ImageError, from_rpc_error
from convserve_client.preprocessing import ImageInput, PreprocessedImages, preprocess_images
from convserve_protocol.protos import classifier_pb2, classifier_pb2_grpc, grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from convserve_client.types import Classification, ModelInfo, RetryPolicy

T = TypeVar("T")

READY_POLL_S = 0.05
"""Gap between two readiness questions while waiting for a server."""
READY_ATTEMPT_S = 1.0
"""Longest wait for one readiness answer."""


class Method(enum.Enum):
    """The unary calls the clients make."""

    CLASSIFY = "Classify"
    MODEL_INFO = "GetModelInfo"
    MODEL_READY = "ModelReady"


class Rpc(NamedTuple):
    """Step: make one call with this timeout; the plan is sent the response or the ``grpc.RpcError``."""

    method: Method
    request: Any
    timeout: float


class Pause(NamedTuple):
    """Step: wait this many seconds; the plan is sent ``None``."""

    seconds: float


Step = Rpc | Pause
Plan = Generator[Step, Any, T]


class PlanRun(Generic[T]):
    """Steps through a plan: ``for step in run: run.reply = <do step>``, then read :attr:`result`."""

    def __init__(self, plan: Plan[T]) -> None:
        self._plan = plan
        self.reply: Any = None
        """What the step just done gave: a response, a ``grpc.RpcError`` or ``None``."""
        self.result: T

    def __iter__(self) -> PlanRun[T]:
        return self

    def __next__(self) -> Step:
        try:
            return self._plan.send(self.reply)
        except StopIteration as done:
            self.result = done.value
            raise StopIteration from None


def stubs(channel: Any) -> dict[Method, Callable[..., Any]]:
    """Each method's callable on ``channel`` (a ``grpc`` or a ``grpc.aio`` channel)."""
    classifier = classifier_pb2_grpc.ClassifierStub(channel)
    inference = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
    return {
        Method.CLASSIFY: classifier.Classify,
        Method.MODEL_INFO: classifier.GetModelInfo,
        Method.MODEL_READY: inference.ModelReady,
    }


@dataclass(frozen=True)
class Settings:
    """What a client was asked for, as the plans need it."""

    model_name: str
    model_version: str
    timeout: float
    retry: RetryPolicy
    max_request_bytes: int


def call(method: Method, request: Any, settings: Settings, clock: Callable[[], float] = time.monotonic) -> Plan[Any]:
    """One unary call within ``settings.timeout`` s, retried on UNAVAILABLE and RESOURCE_EXHAUSTED."""
    deadline = clock() + settings.timeout
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - clock()
        if remaining <= 0:
            raise DeadlineExceededError(f"no answer within {settings.timeout:g} s", grpc.StatusCode.DEADLINE_EXCEEDED)
        reply = yield Rpc(method, request, remaining)
        if not isinstance(reply, grpc.RpcError):
            return reply
        error = from_rpc_error(reply)
        if error.code not in RETRYABLE_CODES or attempt >= settings.retry.max_attempts:
            raise error from reply
        yield Pause(min(settings.retry.backoff(attempt), max(0.0, deadline - clock())))


def wait_until_ready(settings: Settings, timeout: float, clock: Callable[[], float] = time.monotonic) -> Plan[None]:
    """Ask ModelReady until it says yes; ``DeadlineExceededError`` after ``timeout`` s."""
    request = grpc_predict_v2_pb2.ModelReadyRequest(name=settings.model_name, version=settings.model_version)
    deadline = clock() + timeout
    last_error = "no answer"
    while (remaining := deadline - clock()) > 0:
        reply = yield Rpc(Method.MODEL_READY, request, min(remaining, READY_ATTEMPT_S))
        if isinstance(reply, grpc.RpcError):
            error = from_rpc_error(reply)
            if error.code not in RETRYABLE_CODES | {grpc.StatusCode.DEADLINE_EXCEEDED}:
                raise error from reply
            last_error = str(error)
        elif reply.ready:
            return
        else:
            last_error = "model not ready"
        yield Pause(min(READY_POLL_S, max(0.0, deadline - clock())))
    raise DeadlineExceededError(f"server not ready after {timeout:g} s: {last_error}")


def model_info(settings: Settings) -> Plan[ModelInfo]:
    """The served model's description."""
    request = classifier_pb2.GetModelInfoRequest(model_name=settings.model_name, model_version=settings.model_version)
    return _wire.parse_model_info((yield from call(Method.MODEL_INFO, request, settings)))


@dataclass(frozen=True)
class ClassifyJob:
    """A classify call cut into requests of at most the server's batch size, and how to put the answers together."""

    prepared: PreprocessedImages
    requests: tuple[classifier_pb2.ClassifyRequest, ...]
    settings: Settings

    def chunk_plans(self) -> list[Plan[list[Classification]]]:
        """One plan per request; each returns that request's results."""
        return [self._chunk_plan(request) for request in self.requests]

    def _chunk_plan(self, request: classifier_pb2.ClassifyRequest) -> Plan[list[Classification]]:
        response = yield from call(Method.CLASSIFY, request, self.settings)
        return _wire.parse_classify_response(response, request.shape[0])

    def results(self, chunks: Sequence[list[Classification]]) -> list[Classification | ImageError]:
        """Every input's result (or its image's error) in input order, from the chunk plans' results."""
        return _wire.assemble(self.prepared.slots, [row for chunk in chunks for row in chunk])


def classify_job(
    info: ModelInfo,
    images: ImageInput | Sequence[ImageInput],
    settings: Settings,
    top_k: int,
    include_probabilities: bool,
    errors: Literal["raise", "return"],
) -> ClassifyJob:
    """Preprocess ``images`` and cut them into requests; raises the first bad image's error if ``errors="raise"``."""
    _wire.check_top_k(top_k, len(info.labels))
    prepared = preprocess_images(_wire.as_image_list(images), info.preprocessing)
    if prepared.first_error is not None and errors == "raise":
        raise prepared.first_error
    bounds = _wire.chunk_bounds(len(prepared.batch), _wire.rows_per_request(info, settings.max_request_bytes))
    requests = tuple(
        _wire.classify_request(prepared.batch[start:stop], info.name, settings.model_version, top_k,
                               include_probabilities)
        for start, stop in bounds
    )
    return ClassifyJob(prepared, requests, settings)
