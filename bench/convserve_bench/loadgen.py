"""A closed-loop load generator: ``concurrency`` callers, each sending its next request when answered.

It loads gRPC (one channel, as a grpc.aio client shares one) or the HTTP/REST port (aiohttp, one
keep-alive connection per caller, as a pool of HTTP/1.1 connections serves concurrent callers).
A measurement ends when both its duration has passed and it has at least ``min_requests``
answers, so that a short round on a busy machine still measures something: it runs longer,
and its rate is answers over the time they really took.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import grpc.aio
import numpy as np

from convserve_bench import rest, rpc
from convserve_protocol.protos import classifier_pb2_grpc
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc

OIP = "oip"
CLASSIFIER = "classifier"
PROTOCOLS = (OIP, CLASSIFIER)
"""convserve's gRPC APIs."""
HTTP_BINARY = "http-binary"
HTTP_JSON = "http-json"
HTTP_PROTOCOLS = {HTTP_BINARY: rest.BINARY, HTTP_JSON: rest.JSON}
"""The REST ``infer`` encodings, by protocol name."""
REQUEST_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 64 << 20
OK = "OK"
WRONG_ANSWER = "WRONG_ANSWER"
"""An HTTP 200 whose output is not one tensor of (images, classes)."""
TIMEOUT = "TIMEOUT"

Send = Callable[[], Awaitable[str]]
"""Sends one request and returns :data:`OK` or the error's code."""


@dataclass(frozen=True)
class Step:
    """One load level, or one round of it."""

    concurrency: int
    images_per_request: int
    duration_s: float
    warmup_s: float
    min_requests: int = 1
    """Answers (or errors) to wait for even after ``duration_s``."""
    max_duration_s: float = 60.0
    """How long it may run past ``duration_s`` to collect ``min_requests``, for a server that answers nothing."""


@dataclass
class StepResult:
    """What one load level measured."""

    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    @property
    def answered(self) -> int:
        """Requests answered, with or without an error."""
        return len(self.latencies_s) + sum(self.errors.values())

    def merge(self, other: StepResult) -> None:
        """Add another process's measurements (same time window)."""
        self.latencies_s.extend(other.latencies_s)
        self.errors.update(other.errors)
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)

    def append(self, other: StepResult) -> None:
        """Add the measurements of a later time window."""
        self.latencies_s.extend(other.latencies_s)
        self.errors.update(other.errors)
        self.elapsed_s += other.elapsed_s


def _method_and_request(protocol: str, model: rpc.ServedModel,
                        images: np.ndarray) -> tuple[Callable[[grpc.aio.Channel], Any], Any]:
    if protocol == OIP:
        return (lambda channel: pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer,
                rpc.infer_request(images, model.name, model.input_name))
    return (lambda channel: classifier_pb2_grpc.ClassifierStub(channel).Classify,
            rpc.classify_request(images, model.name))


async def _run_step(address: str, protocol: str, model: rpc.ServedModel, step: Step, concurrency: int,
                    min_requests: int) -> StepResult:
    images = np.random.default_rng(0).random((step.images_per_request, *model.image_shape), dtype=np.float32)
    if protocol in HTTP_PROTOCOLS:
        return await _run_http_step(address, rest.infer_request(HTTP_PROTOCOLS[protocol], model, images), step,
                                    concurrency, min_requests)
    return await _run_grpc_step(address, protocol, model, images, step, concurrency, min_requests)


async def _run_grpc_step(address: str, protocol: str, model: rpc.ServedModel, images: np.ndarray, step: Step,
                         concurrency: int, min_requests: int) -> StepResult:
    method_of, request = _method_and_request(protocol, model, images)
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                                           ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
                                         ) as channel:
        method = method_of(channel)

        async def send() -> str:
            try:
                await method(request, timeout=REQUEST_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return OK

        return await _closed_loop([send] * concurrency, step, min_requests)


async def _run_http_step(address: str, request: rest.RestInfer, step: Step, concurrency: int,
                         min_requests: int) -> StepResult:
    async with contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(_http_session(address)) for _ in range(concurrency)]
        return await _closed_loop([_http_sender(session, request) for session in sessions], step, min_requests)


def _http_session(address: str) -> aiohttp.ClientSession:
    """A session of one keep-alive connection to ``address`` (HOST:PORT), without cookies."""
    return aiohttp.ClientSession(f"http://{address}", connector=aiohttp.TCPConnector(limit=1),
                                 timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                                 cookie_jar=aiohttp.DummyCookieJar())


def _http_sender(session: aiohttp.ClientSession, request: rest.RestInfer) -> Send:
    async def send() -> str:
        try:
            async with session.post(request.path, data=request.body, headers=request.headers) as response:
                body = await response.read()
                if response.status != 200:
                    return f"HTTP {response.status}"
                return OK if request.answered_right(response.headers, body) else WRONG_ANSWER
        except aiohttp.ClientError as exc:
            return type(exc).__name__
        except asyncio.TimeoutError:
            return TIMEOUT

    return send


async def _closed_loop(senders: list[Send], step: Step, min_requests: int) -> StepResult:
    """Each sender in a loop of its own until the step is over; the answers after the warm-up, timed."""
    result = StepResult()
    start = time.monotonic()
    measure_from = start + step.warmup_s
    stop_at = measure_from + step.duration_s
    give_up_at = stop_at + step.max_duration_s

    def more_to_send(now: float) -> bool:
        return now < stop_at or (result.answered < min_requests and now < give_up_at)

    async def caller(send: Send) -> None:
        while more_to_send(sent := time.monotonic()):
            code = await send()
            done = time.monotonic()
            if sent >= measure_from:
                if code == OK:
                    result.latencies_s.append(done - sent)
                else:
                    result.errors[code] += 1

    await asyncio.gather(*(caller(send) for send in senders))
    result.elapsed_s = time.monotonic() - measure_from
    return result


def _process_entry(args: tuple[str, str, rpc.ServedModel, Step, int, int]) -> StepResult:
    return asyncio.run(_run_step(*args))


def run_step(address: str, protocol: str, model: rpc.ServedModel, step: Step, processes: int = 1) -> StepResult:
    """Run one load level with ``processes`` worker processes sharing the concurrency and the minimum count.

    ``protocol`` is one of :data:`PROTOCOLS` (gRPC at ``address``) or :data:`HTTP_PROTOCOLS` (REST at ``address``).
    """
    if processes <= 1:
        return asyncio.run(_run_step(address, protocol, model, step, step.concurrency, step.min_requests))
    shares = [step.concurrency // processes + (i < step.concurrency % processes) for i in range(processes)]
    work = [(address, protocol, model, step, share, -(-step.min_requests * share // step.concurrency))
            for share in shares if share > 0]
    with multiprocessing.get_context("spawn").Pool(len(work)) as pool:
        parts = pool.map(_process_entry, work)
    total = StepResult()
    for part in parts:
        total.merge(part)
    return total


def summarize(step: Step, result: StepResult) -> dict[str, Any]:
    """Requests/s, images/s and latency percentiles of one step (NaN where nothing was answered)."""
    latencies = np.asarray(result.latencies_s) * 1000
    requests = len(latencies)
    rate = requests / result.elapsed_s if requests and result.elapsed_s > 0 else float("nan")
    percentile = (lambda q: float(np.percentile(latencies, q))) if requests else (lambda q: float("nan"))
    return {
        "concurrency": step.concurrency,
        "images_per_request": step.images_per_request,
        "requests": requests,
        "seconds": result.elapsed_s,
        "requests_per_s": rate,
        "images_per_s": rate * step.images_per_request,
        "p50_ms": percentile(50),
        "p90_ms": percentile(90),
        "p99_ms": percentile(99),
        "max_ms": float(latencies.max()) if requests else float("nan"),
        "errors": dict(result.errors),
    }
