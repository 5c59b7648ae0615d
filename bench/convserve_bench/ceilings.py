"""The composite ceiling of each step, convserve's ratios to it and to the naive server, and the targets.

The composite ceiling is what a server could do if it cost no more than the do-nothing server's
gRPC and Python plus the model itself: the do-nothing server's time per request, plus
single-threaded in-process ONNX Runtime's time for the request's images. The model is timed at
batch 32 for single-image steps at concurrency 8 or more (a batching server can gather that
many), and at the request's own size otherwise (so batch 1 for single images at concurrency 1).

Throughput: 1 / (1 / do-nothing requests/s + model seconds per request).
Latency: do-nothing p50 + model seconds per request.
The model's time is the median run's: on a shared machine, runs that another process preempted
would make the ceiling lower, and the targets easier, by chance.
The figures are plain dicts, as they appear in ``bench.json``, so anyone can recompute them.

convserve's HTTP/REST port, loaded in the same rounds with binary and with JSON tensors, is judged
against convserve's own gRPC: its requests/s over gRPC's and its p50 less gRPC's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SERVED = "convserve"  # the target names in the report's rows
HTTP_BINARY = "convserve HTTP binary"
HTTP_JSON = "convserve HTTP JSON"
NOOP = "do-nothing"
NAIVE = "naive"
COMPOSITE = "composite"
GATHERED_BATCH = 32
GATHERING_CONCURRENCY = 8


@dataclass(frozen=True)
class Target:
    """One performance target: a ratio of one step, and the bound it must stay within."""

    what: str
    concurrency: int
    images_per_request: int
    ratio: str  # key in the report's ratios
    bound: float
    at_least: bool  # True: ratio >= bound; False: ratio <= bound

    def met(self, value: float) -> bool:
        """Whether ``value`` of :attr:`ratio` meets the target (never for NaN)."""
        return value >= self.bound if self.at_least else value <= self.bound


TARGETS = (
    Target("throughput vs the composite ceiling", 32, 1, "throughput_vs_composite", 0.85, True),
    Target("server CPU µs per request over the do-nothing server's (median of rounds)", 32, 1,
           "cpu_us_over_noop", 200, False),
    Target("p50 vs the composite ceiling", 1, 1, "p50_vs_composite", 1.15, False),
    Target("throughput vs the single-threaded composite", 8, 64, "throughput_vs_composite", 1.74, True),
    Target("HTTP binary tensors' throughput vs gRPC's", 32, 1, "http_binary_throughput_vs_grpc", 0.8, True),
    Target("HTTP JSON tensors' throughput vs gRPC's", 32, 1, "http_json_throughput_vs_grpc", 0.6, True),
    Target("HTTP binary tensors' p50 − gRPC's, ms", 1, 1, "http_binary_p50_minus_grpc_ms", 0.3, False),
)


def composite_batch(concurrency: int, images_per_request: int) -> int:
    """The batch size the model is timed at for a step's composite ceiling."""
    if images_per_request == 1 and concurrency >= GATHERING_CONCURRENCY:
        return GATHERED_BATCH
    return images_per_request


def composite(noop: Mapping[str, Any], model: Mapping[str, Any], images_per_request: int) -> dict[str, float]:
    """The composite ceiling from the do-nothing server's figures and the model's in-process timing.

    ``model`` holds ``batch`` and ``median_s``, the median seconds of one run at that batch size.
    """
    model_s = model["median_s"] / model["batch"] * images_per_request
    seconds = _divide(1.0, noop["requests_per_s"]) + model_s
    return {"requests_per_s": _divide(1.0, seconds), "images_per_s": _divide(images_per_request, seconds),
            "p50_ms": noop["p50_ms"] + 1000 * model_s}


def ratios(served: Mapping[str, Any], naive: Mapping[str, Any] | None,
           ceiling: Mapping[str, Any] | None, noop: Mapping[str, Any] | None = None) -> dict[str, float]:
    """convserve's throughput and p50 over the composite ceiling's and the naive server's, the naive server's
    over the composite ceiling's, and convserve's server CPU per request less the do-nothing server's (keys
    absent where a reference was not run)."""
    found: dict[str, float] = {}
    if noop is not None:
        found["cpu_us_over_noop"] = _difference(served.get("server_cpu_us_per_request"),
                                                noop.get("server_cpu_us_per_request"))
    if ceiling is not None:
        found["throughput_vs_composite"] = _divide(served["requests_per_s"], ceiling["requests_per_s"])
        found["p50_vs_composite"] = _divide(served["p50_ms"], ceiling["p50_ms"])
    if naive is not None:
        found["throughput_vs_naive"] = _divide(served["requests_per_s"], naive["requests_per_s"])
        found["p50_vs_naive"] = _divide(served["p50_ms"], naive["p50_ms"])
        if ceiling is not None:
            found["naive_throughput_vs_composite"] = _divide(naive["requests_per_s"], ceiling["requests_per_s"])
            found["naive_p50_vs_composite"] = _divide(naive["p50_ms"], ceiling["p50_ms"])
    return found


def http_ratios(grpc: Mapping[str, Any], binary: Mapping[str, Any] | None,
                json: Mapping[str, Any] | None) -> dict[str, float]:
    """convserve's HTTP throughput over its gRPC throughput, with binary and with JSON tensors, and its p50 less
    gRPC's in ms, each with both tensor encodings (keys absent where that encoding was not loaded)."""
    found: dict[str, float] = {}
    for key, http in (("http_binary", binary), ("http_json", json)):
        if http is not None:
            found[f"{key}_throughput_vs_grpc"] = _divide(http["requests_per_s"], grpc["requests_per_s"])
            found[f"{key}_p50_minus_grpc_ms"] = _difference(http["p50_ms"], grpc["p50_ms"])
    return found


def _difference(minuend: float | None, subtrahend: float | None) -> float:
    """NaN where either figure is missing."""
    if minuend is None or subtrahend is None:
        return float("nan")
    return minuend - subtrahend


def _divide(numerator: float, denominator: float) -> float:
    """NaN, not an error or infinity, where a figure is missing or zero."""
    if not denominator or math.isnan(denominator) or math.isnan(numerator):
        return float("nan")
    return numerator / denominator
