"""One step of the benchmark: its measured time split into rounds that alternate between the servers.

Every round loads each server in turn (in an order that rotates from round to round) and then times
the model in this process, so that a noisy machine's drift hits all of them alike, and the spread
of the rounds' figures shows how noisy it was.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from convserve_bench.inprocess import InProcessTiming, SingleThreadedModel
from convserve_bench.loadgen import Step, StepResult, run_step
from convserve_bench.processes import LOOPBACK, cpu_seconds, host_cpu_ticks, metric_samples
from convserve_bench.rpc import ServedModel

LATER_ROUND_WARMUP_S = 0.2
MAX_IN_PROCESS_S = 1.0
BATCH_SIZE_METRIC = "convserve_batch_size"


@dataclass(frozen=True)
class LoadTarget:
    """A server to load: its address, the API to call, its processes (for CPU) and its metrics ports (if any)."""

    name: str
    address: str
    protocol: str
    pids: list[int] = field(default_factory=list)
    metrics_ports: list[int] = field(default_factory=list)


@dataclass
class Measured:
    """What one server did in one step: all rounds together, each round, its CPU, and its batches if it says."""

    total: StepResult = field(default_factory=StepResult)
    rounds: list[StepResult] = field(default_factory=list)
    cpu_seconds: float = 0.0
    round_cpu_seconds: list[float] = field(default_factory=list)
    client_cpu_seconds: float = 0.0
    """The load generator's CPU (this process's), 0 where it ran in processes of its own."""
    round_client_cpu_seconds: list[float] = field(default_factory=list)
    batched_images: float = 0.0
    model_calls: float = 0.0
    stolen_ticks: int = 0
    host_ticks: int = 0

    @property
    def steal_percent(self) -> float | None:
        """Share of the machine's CPU time that its hypervisor took while this server was loaded (None if unknown)."""
        return 100 * self.stolen_ticks / self.host_ticks if self.host_ticks else None


def measure_step(targets: list[LoadTarget], model: ServedModel, step: Step, rounds: int, processes: int,
                 in_process: SingleThreadedModel | None, batch: int) -> tuple[dict[str, Measured], list[InProcessTiming]]:
    """Load each target for ``step`` in ``rounds`` alternating slices; each round then times ``in_process`` at
    ``batch`` images for half a slice (at most :data:`MAX_IN_PROCESS_S`)."""
    measured = {target.name: Measured() for target in targets}
    timings: list[InProcessTiming] = []
    for index in range(rounds):
        # The first round warms up fully; later ones only long enough to open their channel.
        warmup = step.warmup_s if index == 0 else min(step.warmup_s, LATER_ROUND_WARMUP_S)
        part = Step(step.concurrency, step.images_per_request, step.duration_s / rounds, warmup,
                    step.min_requests, step.max_duration_s)
        for target in targets[index % len(targets):] + targets[:index % len(targets)]:
            _measure_round(target, model, part, processes, measured[target.name])
        if in_process is not None:
            timings.append(in_process.time(batch, min(part.duration_s / 2, MAX_IN_PROCESS_S)))
    return measured, timings


def _measure_round(target: LoadTarget, model: ServedModel, part: Step, processes: int, into: Measured) -> None:
    before = batch_totals(target.metrics_ports)
    cpu_at_start: list[float] = []
    client_cpu_at_start: list[float] = []

    def note_cpu() -> None:
        cpu_at_start.append(cpu_seconds(target.pids))
        client_cpu_at_start.append(_own_cpu_seconds())

    # The server's and the load generator's CPU count from the end of the warm-up, when the measured requests start.
    timer = threading.Timer(part.warmup_s, note_cpu)
    stolen, ticks = host_cpu_ticks()
    timer.start()
    result = run_step(target.address, target.protocol, model, part, processes)
    timer.join()
    stolen_after, ticks_after = host_cpu_ticks()
    into.stolen_ticks += stolen_after - stolen
    into.host_ticks += ticks_after - ticks
    used = cpu_seconds(target.pids) - cpu_at_start[0]
    into.cpu_seconds += used
    into.round_cpu_seconds.append(used)
    # With several load-generator processes their CPU is theirs, not this process's: not measured.
    client_used = _own_cpu_seconds() - client_cpu_at_start[0] if processes <= 1 else 0.0
    into.client_cpu_seconds += client_used
    into.round_client_cpu_seconds.append(client_used)
    after = batch_totals(target.metrics_ports)
    into.batched_images += after[0] - before[0]
    into.model_calls += after[1] - before[1]
    into.rounds.append(result)
    into.total.append(result)


def _own_cpu_seconds() -> float:
    """User plus system CPU time so far of this process, all its threads (gRPC's own included)."""
    times = os.times()
    return times.user + times.system


def batch_totals(metrics_ports: list[int]) -> tuple[float, float]:
    """(images, model calls) so far, from the batch-size histograms of every worker's metrics port."""
    images = calls = 0.0
    for port in metrics_ports:
        for sample, value in metric_samples(LOOPBACK, port):
            if sample.startswith(f"{BATCH_SIZE_METRIC}_sum{{"):
                images += value
            elif sample.startswith(f"{BATCH_SIZE_METRIC}_count{{"):
                calls += value
    return images, calls
