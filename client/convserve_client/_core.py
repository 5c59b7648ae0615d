"""The clients' logic without their I/O: what to call, when to wait, and what the answers mean.

A *plan* is a generator.  It yields :class:`Rpc` (make this call and send me its response, or the
``grpc.RpcError`` it raised), :class:`Pause` (wait this long and send me ``None``) and :class:`Parallel`
(run these plans concurrently and send me each one's result or exception), and returns its result.  :class:`~convserve_client.Client` carries the steps out with blocking calls and
:class:`~convserve_client.AsyncClient` with awaits; that is all that differs between them.

The retry schedule (:func:`call`) is the SDK's one retry layer: gRPC's own ``retryPolicy`` is not
configured, so attempts never stack.  Each attempt is a new call, so with several replicas the
round-robin balancer picks it a replica afresh, and one that failed (closed, draining) is no longer
among those it picks from.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Generic, Literal, NamedTuple, Sequence, TypeVar, Union

import grpc
import numpy as np

from convserve_client import _inputs, _wire
from convserve_client.errors import (
    RETRYABLE_CODES,
    DeadlineExceededError,
    ImageError,
    InvalidArgumentError,
    MessageTooLargeError,
    NotFoundError,
    from_rpc_error,
    is_retryable,
)
from convserve_client.preprocessing import ImageInput, describe_source, preprocess
from convserve_protocol.protos import classifier_pb2, classifier_pb2_grpc, grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from convserve_client.types import Classification, ModelInfo, RetryPolicy

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_ENCODED_REQUEST_BYTES = 16 * 1024 * 1024
"""Most encoded bytes in one request: the server's default ``--max-encoded-request-bytes``."""
MESSAGE_OVERHEAD_BYTES = 1024
"""Room left for a request's other fields under a server's message limit."""

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


Step = Union[Rpc, Pause, "Parallel"]
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
    max_image_bytes: int = _inputs.DEFAULT_MAX_IMAGE_BYTES
    preprocess: Literal["client", "server"] = "client"

    def target(self, model_name: str | None = None, model_version: str | None = None) -> Target:
        """The model a call asks for: its own choices, else the client's (``None`` leaves each to the client)."""
        for argument, value in (("model_name", model_name), ("model_version", model_version)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{argument} must be a string, got {type(value).__name__}")
        return Target(self.model_name if model_name is None else model_name,
                      self.model_version if model_version is None else model_version)


def call(method: Method, request: Any, settings: Settings, clock: Callable[[], float] = time.monotonic, *,
         retry_not_found: bool = False) -> Plan[Any]:
    """One unary call within ``settings.timeout`` s, retried on UNAVAILABLE and RESOURCE_EXHAUSTED.

    With ``retry_not_found``, NOT_FOUND is retried too: a request for a version chosen by the client may reach a
    replica that does not serve it (yet, or any more), and each attempt is balanced to a replica afresh.
    """
    deadline = clock() + settings.timeout
    attempt = 0
    last_error = ""
    while True:
        attempt += 1
        remaining = deadline - clock()
        if remaining <= 0:
            raise DeadlineExceededError(f"no answer within {settings.timeout:g} s{last_error}",
                                        grpc.StatusCode.DEADLINE_EXCEEDED)
        reply = yield Rpc(method, request, remaining)
        if not isinstance(reply, grpc.RpcError):
            return reply
        error = from_rpc_error(reply)
        last_error = f"; last error: {error}"
        retryable = is_retryable(error) or (retry_not_found and isinstance(error, NotFoundError))
        if not retryable or attempt >= settings.retry.max_attempts:
            raise error from reply
        yield Pause(min(settings.retry.backoff(attempt), max(0.0, deadline - clock())))


def wait_until_ready(settings: Settings, target: Target, timeout: float,
                     clock: Callable[[], float] = time.monotonic) -> Plan[None]:
    """Ask ModelReady until it says yes; ``DeadlineExceededError`` after ``timeout`` s."""
    request = grpc_predict_v2_pb2.ModelReadyRequest(name=target.model_name, version=target.model_version)
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


class Target(NamedTuple):
    """The model a call asked for: a name ("" for the server's default) and a version ("" for its newest)."""

    model_name: str
    model_version: str


@dataclass
class State:
    """What a client learns from its servers and keeps between calls."""

    latest: dict[Target, ModelInfo] = field(default_factory=dict)
    """The description last given for each target asked for; a call for that target preprocesses with it first."""
    by_version: dict[tuple[str, str], ModelInfo] = field(default_factory=dict)
    """Every description seen, by (model name, version): a version's description is the same on every replica."""
    message_limit: int | None = None
    """Most bytes a request may have, once a server has refused a larger one."""

    def remember(self, info: ModelInfo, target: Target | None = None) -> None:
        """Keep ``info`` as its version's description and, with a ``target``, as that target's latest."""
        self.by_version[(info.name, info.version)] = info
        if target is not None:
            self.latest[target] = info


def model_info(settings: Settings, state: State, target: Target, refresh: bool = False) -> Plan[ModelInfo]:
    """The description of ``target``'s model: asked of the server the first time and when ``refresh``, else
    remembered."""
    if refresh or target not in state.latest:
        request = classifier_pb2.GetModelInfoRequest(model_name=target.model_name, model_version=target.model_version)
        state.remember(_wire.parse_model_info((yield from call(Method.MODEL_INFO, request, settings))), target)
    return state.latest[target]


def version_info(settings: Settings, state: State, name: str, version: str) -> Plan[ModelInfo]:
    """The description of version ``version`` of ``name``: remembered, or asked for by version, of a replica that
    serves it (another one is tried while one answers NOT_FOUND)."""
    if (name, version) in state.by_version:
        return state.by_version[(name, version)]
    request = classifier_pb2.GetModelInfoRequest(model_name=name, model_version=version)
    info = _wire.parse_model_info((yield from call(Method.MODEL_INFO, request, settings, retry_not_found=True)))
    state.remember(info)
    return info


class Parallel(NamedTuple):
    """Step: run these plans concurrently; the plan is sent each one's result, or the exception it raised."""

    plans: list[Plan[Any]]


@dataclass(frozen=True)
class ClassifyOptions:
    """What one classify call asked for."""

    top_k: int
    include_probabilities: bool
    errors: Literal["raise", "return"]


Outcome = dict[int, Classification | ImageError]
"""A request's results by the position of each of its images among the call's inputs."""


class ClassifyJob:
    """A classify call's inputs made ready to send, cut into requests within the server's limits, and
    the plans that send them.

    Each input is a tensor row (preprocessed here), encoded bytes (preprocessed by the server, with
    ``Settings.preprocess == "server"``; arrays are always sent as rows) or its :class:`ImageError`.

    Rows are preprocessed with the description the call starts with (``info``).  A request of rows reaches
    whichever replica the balancer picks; when the version that answered is not the described one and
    preprocesses differently (or refuses the rows' shape), the request is preprocessed again with the
    description of a version and sent pinned to that version, so that rows always meet the version they were
    made for, whichever replica answers.  Every result names the model and version that produced it.
    """

    def __init__(self, info: ModelInfo, inputs: Sequence[ImageInput], settings: Settings, state: State,
                 options: ClassifyOptions, target: Target) -> None:
        self.info, self.settings, self.state, self.options, self.target = info, settings, state, options, target
        self.inputs = inputs
        self.rows: dict[int, np.ndarray] = {}
        self.encoded: dict[int, bytes] = {}
        self.errors: dict[int, ImageError] = {}
        for index, image in enumerate(inputs):
            try:
                self._prepare(index, image)
            except ImageError as exc:
                exc.index = index
                self.errors[index] = exc
            except Exception as exc:  # a decoder's own bug must still be that image's error alone
                self.errors[index] = ImageError(f"{describe_source(image)}: {exc}", describe_source(image), index)

    def _prepare(self, index: int, image: ImageInput) -> None:
        max_bytes = self.settings.max_image_bytes
        if self.settings.preprocess == "server" and (data := _inputs.encoded(image, max_bytes)) is not None:
            self.encoded[index] = data
            return
        self.rows[index] = preprocess(image, self.info.preprocessing, max_bytes=max_bytes)

    @property
    def first_error(self) -> ImageError | None:
        """The error of the first input that could not be prepared, if any."""
        return self.errors[min(self.errors)] if self.errors else None

    def _message_limit(self, default: int) -> int:
        learned = self.state.message_limit
        return default if learned is None else min(default, learned)

    def chunks(self) -> list[tuple[int, ...]]:
        """The inputs' positions, grouped one request each."""
        rows_limit = _wire.rows_per_request(self.info, self._message_limit(self.settings.max_request_bytes))
        row_positions = sorted(self.rows)
        chunks = [tuple(row_positions[start:stop]) for start, stop in _wire.chunk_bounds(len(row_positions), rows_limit)]
        encoded_positions = sorted(self.encoded)
        sizes = [len(self.encoded[position]) for position in encoded_positions]
        encoded_total = self._message_limit(MAX_ENCODED_REQUEST_BYTES)
        chunks += [tuple(encoded_positions[start:stop])
                   for start, stop in _wire.pack_by_size(sizes, rows_limit, encoded_total)]
        return chunks

    def _batch(self, positions: Sequence[int], info: ModelInfo) -> np.ndarray:
        """The rows at ``positions``, preprocessed for ``info``'s version."""
        if info.preprocessing == self.info.preprocessing:
            return np.stack([self.rows[p] for p in positions])
        max_bytes = self.settings.max_image_bytes
        return np.stack([preprocess(self.inputs[p], info.preprocessing, max_bytes=max_bytes) for p in positions])

    def request(self, positions: Sequence[int], info: ModelInfo | None = None) -> classifier_pb2.ClassifyRequest:
        """The request for the inputs at ``positions`` (all rows, or all encoded): for the version the caller
        asked for, or, given ``info``, preprocessed for its version and pinned to it."""
        options = self.options
        name, version = self.info.name, self.target.model_version
        if positions[0] in self.encoded:
            return _wire.encoded_classify_request([self.encoded[p] for p in positions], name, version,
                                                  options.top_k, options.include_probabilities)
        if info is not None:
            name, version = info.name, info.version
        return _wire.classify_request(self._batch(positions, info or self.info), name, version,
                                      options.top_k, options.include_probabilities)

    def chunk_plan(self, positions: tuple[int, ...]) -> Plan[Outcome]:
        """Send one request and return its results.

        A message over the server's limit teaches the client that limit and is sent again in two halves;
        an encoded image the server cannot decode becomes that input's error and the rest are sent again;
        rows that met another version than the one they were made for are sent again as that version's (or
        the described version's) rows, pinned to it.
        """
        request = self.request(positions)
        try:
            response = yield from call(Method.CLASSIFY, request, self.settings)
        except MessageTooLargeError as exc:
            limit = exc.limit - MESSAGE_OVERHEAD_BYTES if exc.limit else request.ByteSize() // 2
            return (yield from self._split(positions, exc, limit))
        except InvalidArgumentError as exc:
            if (limit := _wire.model_input_limit(exc.message)) is not None:
                return (yield from self._split(positions, exc, limit))
            if self._follows_versions(positions) and _wire.is_wrong_shape(exc.message):
                return (yield from self._after_wrong_shape(positions))
            return (yield from self._without_bad_image(positions, exc))
        # An answer without a version (a server older than ClassifyResponse.model_version) is taken as it comes.
        if self._follows_versions(positions) and response.model_version not in ("", self.info.version):
            answered = yield from version_info(self.settings, self.state, response.model_name or self.info.name,
                                               response.model_version)
            self._note_newer(answered)
            if answered.preprocessing != self.info.preprocessing:
                return (yield from self._pinned_plan(positions, answered))
        return self._outcome(positions, response)

    def _follows_versions(self, positions: Sequence[int]) -> bool:
        """Whether these inputs are rows whose version the client chose (not the caller, not the server)."""
        return not self.target.model_version and positions[0] in self.rows

    def _outcome(self, positions: Sequence[int], response: classifier_pb2.ClassifyResponse) -> Outcome:
        return dict(zip(positions, _wire.parse_classify_response(response, len(positions))))

    def _note_newer(self, info: ModelInfo) -> None:
        """Start the next calls for this target with ``info`` if it describes a newer version than they would."""
        latest = self.state.latest.get(self.target)
        if latest is None or _version_order(info.version) > _version_order(latest.version):
            self.state.latest[self.target] = info

    def _after_wrong_shape(self, positions: tuple[int, ...]) -> Plan[Outcome]:
        """The replica that answered serves another input size: ask for the description again, and send the rows
        made for the version it names, pinned to it (the described version's own rows if it names that one)."""
        log.info("the served model changed; asking for its description again")
        fresh = yield from model_info(self.settings, self.state, self.target, refresh=True)
        _wire.check_top_k(self.options.top_k, len(fresh.labels))
        return (yield from self._pinned_plan(positions, fresh))

    def _pinned_plan(self, positions: tuple[int, ...], info: ModelInfo, second: bool = False) -> Plan[Outcome]:
        """Send the rows at ``positions`` preprocessed for ``info``'s version and pinned to it; if no replica
        serves that version any more, once more with the description the server gives now."""
        try:
            response = yield from call(Method.CLASSIFY, self.request(positions, info), self.settings,
                                       retry_not_found=True)
        except NotFoundError:
            if second:
                raise
            fresh = yield from model_info(self.settings, self.state, self.target, refresh=True)
            if (fresh.name, fresh.version) == (info.name, info.version):
                raise
            return (yield from self._pinned_plan(positions, fresh, second=True))
        return self._outcome(positions, response)

    def _without_bad_image(self, positions: tuple[int, ...], refusal: InvalidArgumentError) -> Plan[Outcome]:
        """The encoded image the server blames becomes that input's error, and the rest are sent again."""
        blamed = _wire.bad_encoded_image(refusal.message) if positions[0] in self.encoded else None
        if blamed is None or blamed[0] >= len(positions):
            raise refusal
        bad = positions[blamed[0]]
        source = describe_source(self.inputs[bad])
        reason = blamed[1].removeprefix(f"{describe_source(self.encoded[bad])}: ")  # the server's name for it
        error = ImageError(f"{source}: {reason}", source, bad)
        if self.options.errors == "raise":
            raise error from refusal
        rest = tuple(position for position in positions if position != bad)
        return {bad: error} | ((yield from self.chunk_plan(rest)) if rest else {})

    def _split(self, positions: tuple[int, ...], refusal: Exception, limit: int) -> Plan[Outcome]:
        """Remember the server's ``limit`` on a request's bytes and send ``positions`` again in two halves."""
        if len(positions) == 1:
            raise refusal
        limit = max(1, limit)
        self.state.message_limit = limit if self.state.message_limit is None else min(self.state.message_limit, limit)
        log.info("the server refused %d images in one request; sending at most %d bytes a request",
                 len(positions), limit)
        half = len(positions) // 2
        first = yield from self.chunk_plan(positions[:half])
        return first | (yield from self.chunk_plan(positions[half:]))

    def results(self, outcomes: Sequence[Outcome]) -> list[Classification | ImageError]:
        """Every input's result (or its image's error) in input order."""
        merged: Outcome = dict(self.errors)
        for outcome in outcomes:
            merged |= outcome
        return [merged[index] for index in range(len(self.inputs))]


def _version_order(version: str) -> tuple[int, str]:
    """A key that sorts version names as numbers where they are numbers."""
    return (int(version), "") if version.isdigit() else (-1, version)


def classify(images: ImageInput | Sequence[ImageInput], settings: Settings, state: State, target: Target,
             options: ClassifyOptions) -> Plan[list[Classification | ImageError]]:
    """Classify ``images`` with ``target``'s model, following a hot swap or replicas at different versions.

    The model's description is remembered between calls and the images are preprocessed with it; see
    :class:`ClassifyJob` for what happens when another version answers.
    """
    inputs = _wire.as_image_list(images)
    info = yield from model_info(settings, state, target)
    _wire.check_top_k(options.top_k, len(info.labels))
    job = ClassifyJob(info, inputs, settings, state, options, target)
    if job.first_error is not None and options.errors == "raise":
        raise job.first_error
    outcomes = yield Parallel([job.chunk_plan(chunk) for chunk in job.chunks()])
    failure = next((outcome for outcome in outcomes if isinstance(outcome, BaseException)), None)
    if failure is not None:
        raise failure
    return job.results(outcomes)
