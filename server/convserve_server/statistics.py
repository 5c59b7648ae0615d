"""Cumulative inference statistics of one served model version, in the terms of Triton's statistics extension.

The batcher reports each model call once, to one observer: a version's
:class:`VersionStatistics`, which keeps its own counts and hands the same
report on to the server's metrics (``/metrics``), so both come from one
measurement.  Like the metrics, it is updated and read on the event loop's
thread only, and kept cheap: it runs for every request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from convserve_server.batcher import BatchObserver

NS_PER_S = 1_000_000_000


@dataclass(slots=True)
class Duration:
    """How many times something happened and how long it took in all (Triton's StatisticDuration)."""

    count: int = 0
    seconds: float = 0.0  # summed as /metrics sums it; nanoseconds only when read

    def add(self, seconds: float, times: int = 1) -> None:
        """Count ``times`` occurrences of ``seconds`` each."""
        self.count += times
        self.seconds += seconds * times

    @property
    def ns(self) -> int:
        """The total in nanoseconds."""
        return round(self.seconds * NS_PER_S)


@dataclass(slots=True)
class VersionStatistics:
    """What one model version has done since it was loaded; a batcher's observer.

    Per request (Triton's convention): ``success`` and ``fail`` time each
    request from admission by the core to its answer; ``queue`` is its wait in
    the batcher; ``compute_infer`` is the model call it was part of.  Per model
    call: ``execution_count``, and ``batch_compute`` by batch size in images.
    convserve has no separate input or output copy step (both are inside the
    model call), so those are not kept.
    """

    forward_to: BatchObserver | None = None
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    batch_compute: dict[int, Duration] = field(default_factory=dict)

    def observe_batch(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
        """One model call of ``rows`` images for ``len(queue_seconds)`` requests (the batcher reports it)."""
        self.inference_count += rows
        self.execution_count += 1
        requests = len(queue_seconds)
        self.queue.count += requests
        self.queue.seconds += sum(queue_seconds)
        self.compute_infer.add(compute_seconds, times=requests)
        calls = self.batch_compute.get(rows)
        if calls is None:
            calls = self.batch_compute[rows] = Duration()
        calls.add(compute_seconds)
        if self.forward_to is not None:
            self.forward_to.observe_batch(rows, queue_seconds, compute_seconds)

    def observe_queue_depth(self, requests: int) -> None:
        """Passed on to the metrics; the statistics do not keep it."""
        if self.forward_to is not None:
            self.forward_to.observe_queue_depth(requests)

    def record_success(self, seconds: float) -> None:
        """A request was answered after ``seconds`` in the core."""
        self.success.add(seconds)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, seconds: float) -> None:
        """A request for this version failed after ``seconds`` in the core."""
        self.fail.add(seconds)
