"""A closed-loop load generator: ``concurrency`` callers, each sending its next request when answered."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import grpc.aio
import numpy as np

from convserve_protocol.protos import classifier_pb2, classifier_pb2_grpc
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Step:
    """One load level."""

    concurrency: int
    images_per_request: int
    duration_s: float
    warmup_s: float


@dataclass
class StepResult:
    """What one load level measured."""

    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

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


def _request_factory(protocol: str, model: str, images: np.ndarray):
    if protocol == "oip":
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="image", datatype="FP32", shape=list(images.shape))
        request.raw_input_contents.append(images.astype("<f4").tobytes())
        return lambda channel: pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, request
    request = classifier_pb2.ClassifyRequest(model_name=model, images=images.astype("<f4").tobytes(),
                                             shape=list(images.shape), top_k=1)
    return lambda channel: classifier_pb2_grpc.ClassifierStub(channel).Classify, request


async def _run_step(address: str, protocol: str, model: str, shape: tuple[int, int, int], step: Step,
                    concurrency: int) -> StepResult:
    images = np.random.default_rng(0).random((step.images_per_request, *shape), dtype=np.float32)
    method_of, request = _request_factory(protocol, model, images)
    result = StepResult()
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        method = method_of(channel)
        start = time.monotonic()
        measure_from = start + step.warmup_s
        stop_at = measure_from + step.duration_s

        async def caller() -> None:
            while True:
                sent = time.monotonic()
                if sent >= stop_at:
                    return
                code = "OK"
                try:
                    await method(request, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                done = time.monotonic()
                if sent >= measure_from:
                    if code == "OK":
                        result.latencies_s.append(done - sent)
                    else:
                        result.errors[code] += 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        result.elapsed_s = time.monotonic() - measure_from
    return result


def _process_entry(args: tuple[str, str, str, tuple[int, int, int], Step, int]) -> StepResult:
    return asyncio.run(_run_step(*args))


def run_step(address: str, protocol: str, model: str, shape: tuple[int, int, int], step: Step,
             processes: int = 1) -> StepResult:
    """Run one load level with ``processes`` worker processes sharing the concurrency."""
    if processes <= 1:
        return asyncio.run(_run_step(address, protocol, model, shape, step, step.concurrency))
    shares = [step.concurrency // processes + (i < step.concurrency % processes) for i in range(processes)]
    work = [(address, protocol, model, shape, step, share) for share in shares if share > 0]
    with multiprocessing.get_context("spawn").Pool(len(work)) as pool:
        parts = pool.map(_process_entry, work)
    total = StepResult()
    for part in parts:
        total.merge(part)
    return total


def summarize(step: Step, result: StepResult) -> dict[str, float | int | dict[str, int]]:
    """Requests/s, images/s and latency percentiles of one step."""
    latencies = np.asarray(result.latencies_s) * 1000
    requests = len(latencies)
    rate = requests / result.elapsed_s if result.elapsed_s > 0 else 0.0
    percentile = (lambda q: float(np.percentile(latencies, q))) if requests else (lambda q: float("nan"))
    return {
        "concurrency": step.concurrency,
        "images_per_request": step.images_per_request,
        "requests": requests,
        "requests_per_s": rate,
        "images_per_s": rate * step.images_per_request,
        "p50_ms": percentile(50),
        "p90_ms": percentile(90),
        "p99_ms": percentile(99),
        "max_ms": float(latencies.max()) if requests else float("nan"),
        "errors": dict(result.errors),
    }
