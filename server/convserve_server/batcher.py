"""The dynamic batcher, with Triton's semantics, on one execution path.

Requests join one bounded queue (full: :class:`Overloaded`); a request larger
than ``max_batch_size`` rows joins it as several chunks, answered together and
in order.  Every decision is taken on the event loop, once per loop turn, at
the end of the turn in which requests arrived (:meth:`DynamicBatcher._dispatch`),
so requests that arrive together compute together:

- **when**: at once; or, with ``max_queue_delay_s`` set, once the batch is full
  or that long after its oldest request arrived;
- **what**: one take of up to ``max_batch_size`` rows from the head of the
  queue, dropping requests whose deadline passed or whose caller gave up;
- **where**: on the event loop itself when the batch is expected to cost less
  than handing it to a model-instance thread and back, else on an idle
  instance thread (none idle: it waits in the queue, growing, until one is).
  Both costs are measured (:class:`BatchCosts`), at warm-up and as batches run,
  so a slow or GPU model keeps its threads and never blocks the loop, and a
  model cheaper than a thread wake-up pays none.

Both places run the same compute function; a batch that fails is run request
by request, so only a bad request fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from convserve_server.errors import DeadlineExpired, InvalidInput, ModelNotReady, Overloaded

log = logging.getLogger(__name__)

SMOOTHING = 0.1
"""Weight of each new measurement in a running cost estimate (about the last ten batches count)."""

CALIBRATION_RUNS = 5
"""Runs per batch size and hand-offs timed at calibration; the median is kept."""

INSTANCE_NICENESS = 5
"""How much lower than the event loop's the instance threads' scheduling priority is (Linux nice levels: each
level is about 1.25 times less CPU weight, so 5 gives the loop about three times an instance's share)."""

CALIBRATION_IDLE_S = 0.005
"""How long an instance thread waits idle before each calibration hand-off: long enough for its vCPU to go idle,
as between a lone caller's requests."""


class BatchObserver(Protocol):
    """Receives the batcher's measurements on the event loop's thread (the server's metrics implement it)."""

    def observe_batch(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
        """One model call: its size, how long each request queued, how long it ran."""

    def observe_queue_depth(self, requests: int) -> None:
        """The number of queued requests changed."""


class BatchCosts:
    """What running a batch costs: the model's time by batch size, and a round trip to an instance thread.

    Until the hand-off has been measured every batch goes to a thread: nothing is assumed cheap.  Estimates
    for sizes not yet seen are interpolated linearly between the nearest measured sizes (and extrapolated
    in proportion to the rows beyond the largest).  Updated on the event loop's thread only.
    """

    def __init__(self, handoff_s: float | None = None, compute_s: dict[int, float] | None = None) -> None:
        self.handoff_s = handoff_s
        self._compute_s: dict[int, float] = dict(compute_s or {})

    def cheaper_on_loop(self, rows: int) -> bool:
        """Whether a batch of ``rows`` is expected to compute faster than a hand-off to a thread and back."""
        if self.handoff_s is None:
            return False
        expected = self.expected_compute_s(rows)
        return expected is not None and expected < self.handoff_s

    def expected_compute_s(self, rows: int) -> float | None:
        """The model's expected time for ``rows`` rows, or None before any batch was measured."""
        known = self._compute_s
        if rows in known:
            return known[rows]
        if not known:
            return None
        below = max((size for size in known if size < rows), default=None)
        above = min((size for size in known if size > rows), default=None)
        if above is None:
            assert below is not None
            return known[below] * rows / below
        if below is None:
            return known[above]
        share = (rows - below) / (above - below)
        return known[below] + share * (known[above] - known[below])

    def observe_compute(self, rows: int, seconds: float) -> None:
        """One model call of ``rows`` rows took ``seconds``."""
        self._compute_s[rows] = _smoothed(self._compute_s.get(rows), seconds)

    def observe_handoff(self, seconds: float) -> None:
        """A batch's time in transit to a thread and back, its compute excluded; counted for at most the
        interpreter's switch interval (``sys.getswitchinterval()``, 5 ms by default).

        A woken thread waits for the GIL at most that long; a longer measurement is the host's scheduling (a
        loaded machine, a starved thread), and must not talk the estimate into running long batches on the loop.
        """
        self.handoff_s = _smoothed(self.handoff_s, min(seconds, sys.getswitchinterval()))

    def snapshot(self) -> dict[str, object]:
        """The current estimates, for logs and tests: the hand-off, and the compute time by batch size."""
        return {"handoff_s": self.handoff_s, "compute_s": dict(sorted(self._compute_s.items()))}


def _smoothed(previous: float | None, seconds: float) -> float:
    return seconds if previous is None else previous + SMOOTHING * (seconds - previous)


@dataclass(eq=False)
class _Pending:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    deadline: float | None
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Computed:
    """A batch's outcome: per request its output or its error, with when the computing started and its time.

    ``rows_measured``: the rows of the one clean model call that ``seconds`` timed (0 when the batch failed).
    """

    outcomes: list[tuple[_Pending, np.ndarray | BaseException]]
    started: float
    seconds: float
    rows_measured: int = 0


@dataclass(eq=False)
class _Job:
    """A batch handed to an instance thread (empty: a calibration round trip, which runs ``probe``)."""

    batch: list[_Pending]
    handed: float
    probe: np.ndarray | None = None
    started: float = 0.0  # when the thread took it (time.monotonic)
    computed: list[_Computed] | None = None
    finished: float = 0.0  # when the thread was done with it (time.monotonic)


class DynamicBatcher:
    """Batches calls of ``run_batch`` (rows in, rows out) across concurrent callers.

    ``instances`` worker threads, and the event loop's thread, may call ``run_batch`` at once, so it must be
    safe to call from several threads (an ONNX Runtime session is).  ``costs`` holds known estimates (tests
    use it to pin where batches run); by default they are measured by :meth:`calibrate` and as batches run.
    """

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        instances: int = 1,
        max_queue_delay_s: float = 0.0,
        max_queue_size: int = 1024,
        observer: BatchObserver | None = None,
        name: str = "model",
        costs: BatchCosts | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be an integer >= 1")
        if instances < 1:
            raise ValueError("instances must be an integer >= 1")
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be an integer >= 1")
        if max_queue_delay_s < 0:
            raise ValueError("max_queue_delay_s must be >= 0")
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._instances = instances
        self._max_queue_delay_s = max_queue_delay_s
        self._max_queue_size = max_queue_size
        self._observer = observer
        self._name = name
        self.costs = costs if costs is not None else BatchCosts()
        # Everything below is read and changed on the loop's thread only; the threads see their jobs.
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._idle = 0  # instance threads waiting for a job
        self._dispatch_handle: asyncio.Handle | None = None  # a dispatch at the end of this loop turn
        self._fill_timer: asyncio.TimerHandle | None = None  # a dispatch when the queue delay ends
        self._calibration_done: asyncio.Future[float] | None = None
        self._calibrating = False  # requests are refused until the costs are measured
        self._beyond_wake_s = 0.0  # a hand-off's cost beyond waking the thread (the way back, a colder run)
        self._closing = False
        self._stopped_reason: str | None = None  # set when a worker died: the batcher refuses everything
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = 0  # worker threads alive
        self._stop_sent = False
        self._stopped: asyncio.Future[None] | None = None

    @property
    def queue_depth(self) -> int:
        """Requests (or chunks of oversized ones) waiting for a model instance."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        """Started and calibrated, not closed, and no worker has died."""
        return self._loop is not None and not self._closing and not self._calibrating

    def start(self) -> None:
        """Start one worker thread per instance; answers go back to the running loop."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopped = self._loop.create_future()
        self._running = self._idle = self._instances
        for index in range(self._instances):
            threading.Thread(target=self._work, name=f"{self._name}-instance-{index}", daemon=True).start()

    async def calibrate(self, sample: np.ndarray) -> None:
        """Measure the model on ``sample``'s first 1, 2, 4 ... rows (off the loop) and what a hand-off adds.

        Call after :meth:`start`; until it returns, requests are refused (ModelNotReady), so that none runs
        before the costs are known.  ``sample`` holds ``max_batch_size`` rows.  A hand-off
        is timed as a request on an idle model meets it: a one-row batch handed to an instance thread that
        has been idle for a moment, from the hand-off until its answer is back on the loop, less the same
        batch's time run back to back.  That includes waking the thread and its CPU, and the colder caches
        the model then runs with.
        """
        self._calibrating = True
        try:
            await self._measure_costs(sample)
        finally:
            self._calibrating = False
        log.info("%s: a hand-off to an instance thread and back adds %.0f µs; batches expected to cost less "
                 "run on the event loop (up to %d rows here)", self._name, (self.costs.handoff_s or 0) * 1e6,
                 self._largest_on_loop())

    async def _measure_costs(self, sample: np.ndarray) -> None:
        """The model by batch size, then the hand-off; ModelNotReady if the batcher closes or breaks meanwhile."""
        for rows in _calibration_sizes(min(len(sample), self._max_batch_size)):
            seconds = await asyncio.to_thread(self._time_model, sample[:rows])
            self.costs.observe_compute(rows, seconds)
        hot = self.costs.expected_compute_s(1) or 0.0
        loop = asyncio.get_running_loop()
        round_trips, wakes = [], []
        for _ in range(CALIBRATION_RUNS):
            await asyncio.sleep(CALIBRATION_IDLE_S)  # the instance thread goes back to waiting, its CPU idles
            if self._closing or not self._idle:
                raise ModelNotReady(self._stopped_reason or "the model's batcher closed while it was calibrated")
            done = loop.create_future()
            self._calibration_done = done
            self._idle -= 1  # an instance takes it now: no request is dispatched while calibrating
            job = _Job([], time.monotonic(), probe=sample[:1])
            self._jobs.put(job)
            answered = await done
            round_trips.append(answered - job.handed)
            wakes.append(job.started - job.handed)
        self.costs.handoff_s = None
        self.costs.observe_handoff(max(statistics.median(round_trips) - hot, 0.0))
        self._beyond_wake_s = max((self.costs.handoff_s or 0.0) - statistics.median(wakes), 0.0)

    def _time_model(self, rows: np.ndarray) -> float:
        """The median time of back-to-back runs of the model on ``rows``."""
        times = []
        for _ in range(CALIBRATION_RUNS):
            started = time.monotonic()
            self._run_batch(rows)
            times.append(time.monotonic() - started)
        return statistics.median(times)

    def _largest_on_loop(self) -> int:
        return max((rows for rows in range(1, self._max_batch_size + 1) if self.costs.cheaper_on_loop(rows)),
                   default=0)

    async def close(self) -> None:
        """Refuse new requests, answer every queued one, then stop the workers."""
        if self._loop is None:
            return
        self._closing = True
        self._schedule_dispatch()
        assert self._stopped is not None
        await asyncio.shield(self._stopped)

    async def submit(self, rows: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Queue ``rows`` and await their results; larger requests are split and reassembled in order.

        ``deadline`` is a ``time.monotonic()`` instant after which the request
        is dropped before compute (DeadlineExpired).  Raises Overloaded when the
        queue is full, InvalidInput when the request needs more chunks than the
        queue can ever hold (retrying could never help), ModelNotReady once the
        batcher is closing or stopped.
        """
        loop = self._loop
        if loop is None:
            raise ModelNotReady("the model's batcher has not started")
        if self._closing:
            raise ModelNotReady(self._stopped_reason or "server is draining; not accepting new requests")
        if self._calibrating:
            raise ModelNotReady(f"{self._name} is warming up; retry shortly")
        size = self._max_batch_size
        self._check_fits(len(rows))
        if len(rows) <= size:
            pending = [_Pending(rows, loop.create_future(), deadline)]
        else:
            pending = [_Pending(rows[start : start + size], loop.create_future(), deadline)
                       for start in range(0, len(rows), size)]
        if len(self._queue) + len(pending) > self._max_queue_size:
            raise Overloaded(f"queue full ({self._max_queue_size} requests waiting); retry later")
        self._queue.extend(pending)
        self._queued_rows += len(rows)
        self._schedule_dispatch()
        if len(pending) == 1:
            return await pending[0].future
        return np.concatenate(await asyncio.gather(*(item.future for item in pending)))

    def _check_fits(self, rows: int) -> None:
        """InvalidInput if a request of ``rows`` needs more chunks than the queue holds even when empty."""
        limit = self._max_batch_size * self._max_queue_size
        if rows > limit:
            raise InvalidInput(f"{rows} images need {-(-rows // self._max_batch_size)} chunks of max_batch_size "
                               f"{self._max_batch_size}, more than the queue holds (max_queue_size "
                               f"{self._max_queue_size}): send at most {limit} images a request")

    # --- on the loop's thread: when, what and where -------------------------------------------

    def _schedule_dispatch(self) -> None:
        """Dispatch once at the end of this loop turn, whatever else arrives in it."""
        if self._dispatch_handle is None and self._loop is not None:
            self._dispatch_handle = self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Start what the queue and the instances allow: batches for every idle instance that a batch is too
        dear to run here, or one cheap batch here (then again next turn, with what arrived meanwhile)."""
        self._dispatch_handle = None
        while self._queue and self._stopped_reason is None:
            wait_s = self._fill_wait_s()
            if wait_s > 0:
                self._dispatch_later(wait_s)
                break
            here = self.costs.cheaper_on_loop(min(self._queued_rows, self._max_batch_size))
            if not here and not self._idle:
                break  # an instance that finishes dispatches again; meanwhile the queue grows
            batch = self._take()
            if not batch:
                continue
            if here:
                self._compute_here(batch)
                if self._queue or self._closing:
                    self._schedule_dispatch()
                break
            self._idle -= 1
            self._jobs.put(_Job(batch, time.monotonic()))
        self._report_depth()
        if self._closing and not self._queue and self._idle == self._running and not self._stop_sent:
            self._stop_sent = True
            for _ in range(self._running):
                self._jobs.put(None)

    def _dispatch_later(self, wait_s: float) -> None:
        """Dispatch again in ``wait_s`` (the queue delay); a dispatch at the end of a turn may come first."""
        assert self._loop is not None
        when = self._loop.time() + wait_s
        if self._fill_timer is not None:
            if self._fill_timer.when() <= when:
                return
            self._fill_timer.cancel()
        self._fill_timer = self._loop.call_at(when, self._fill_time_over)

    def _fill_time_over(self) -> None:
        self._fill_timer = None
        self._dispatch()

    def _compute_here(self, batch: list[_Pending]) -> None:
        """Compute a cheap batch on the loop's thread and answer it; a broken model stops the batcher."""
        try:
            calls = self._compute(batch)
        except (KeyboardInterrupt, SystemExit):
            self._fail(batch, ModelNotReady("the server is stopping"))
            raise
        except BaseException as exc:  # not a bad request (those are caught per batch): the model is broken
            reason = f"batcher stopped: {type(exc).__name__}: {exc}"
            log.error("%s: the model failed on the event loop", self._name, exc_info=True)
            self._fail(batch, ModelNotReady(reason))
            self._stop_for(reason)
            return
        for computed in calls:
            self._settle(computed)

    def _fill_wait_s(self) -> float:
        """How much longer the queue delay holds the head's batch for more rows (0: run it now)."""
        if self._max_queue_delay_s <= 0 or self._closing or self._queued_rows >= self._max_batch_size:
            return 0.0
        return max(self._queue[0].enqueued + self._max_queue_delay_s - time.monotonic(), 0.0)

    def _take(self) -> list[_Pending]:
        """Pop up to ``max_batch_size`` rows from the queue's head; fail expired requests, skip cancelled ones."""
        batch: list[_Pending] = []
        expired: list[_Pending] = []
        rows = 0
        now = time.monotonic()
        pending = self._queue
        while pending and rows + len(pending[0].rows) <= self._max_batch_size:
            item = pending.popleft()
            self._queued_rows -= len(item.rows)
            if item.future.done():  # its caller gave up
                continue
            if item.deadline is not None and now >= item.deadline:
                expired.append(item)
                continue
            batch.append(item)
            rows += len(item.rows)
        self._fail(expired, DeadlineExpired("deadline passed while queued"))
        return batch

    def _settle(self, computed: _Computed) -> None:
        """Answer the requests of one computed batch and report it."""
        answered = []
        for item, outcome in computed.outcomes:
            if item.future.done():  # its caller gave up while it computed
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)
                answered.append(item)
        if computed.rows_measured:
            self.costs.observe_compute(computed.rows_measured, computed.seconds)
        if answered and self._observer is not None:
            self._observer.observe_batch(sum(len(item.rows) for item in answered),
                                         [computed.started - item.enqueued for item in answered], computed.seconds)

    def _fail(self, items: list[_Pending], error: BaseException) -> None:
        """Fail the futures of requests that were not, or could not be, computed."""
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.observe_queue_depth(len(self._queue))

    def _job_done(self, job: _Job) -> None:
        """An instance thread finished ``job``: answer it, learn from its timing, dispatch what waits."""
        self._idle += 1
        answered = time.monotonic()
        calls = job.computed
        if calls is None:  # a calibration round trip
            done = self._calibration_done
            if done is not None and not done.done():  # else calibration was cancelled or failed meanwhile
                done.set_result(answered)
        else:
            # Only the wake-up is measured here.  The way back waits behind whatever else the loop is doing,
            # which a batch computed on the loop waits behind as well; it and the colder run are as calibrated.
            self.costs.observe_handoff((calls[0].started - job.handed) + self._beyond_wake_s)
            for computed in calls:
                self._settle(computed)
        self._schedule_dispatch()

    def _worker_stopped(self, job: _Job | None, reason: str | None) -> None:
        self._running -= 1
        if reason is not None:
            if job is not None:
                self._fail(job.batch, ModelNotReady(reason))
            self._stop_for(reason)
        if self._running == 0 and self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def _stop_for(self, reason: str) -> None:
        """The model or an instance is broken: fail what is queued, refuse what comes, stop the instances."""
        if self._stopped_reason is None:
            self._stopped_reason = reason
            self._closing = True
            self._fail(list(self._queue), ModelNotReady(reason))
            self._queue.clear()
            self._queued_rows = 0
            self._report_depth()
        if self._calibration_done is not None and not self._calibration_done.done():
            self._calibration_done.set_exception(ModelNotReady(reason))
        self._schedule_dispatch()  # stops the idle instances

    def _post(self, callback: Callable[..., object], *args: object) -> None:
        """Run ``callback(*args)`` on the loop's thread (from a worker)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody awaits these answers any more
            pass

    # --- on the loop's thread or an instance thread -------------------------------------------

    def _compute(self, batch: list[_Pending]) -> list[_Computed]:
        """Run one batch as one model call; if it fails, run each request alone, so that only a bad one fails.
        One outcome per model call."""
        started = time.monotonic()
        try:
            outputs = self._run_rows([item.rows for item in batch])
        except Exception as exc:
            if len(batch) <= 1:
                return [_Computed([(item, exc) for item in batch], started, time.monotonic() - started)]
            log.warning("%s: a batch of %d requests failed (%s); running each alone", self._name, len(batch), exc)
            return [computed for item in batch for computed in self._compute([item])]
        seconds = time.monotonic() - started
        return [_Computed(list(zip(batch, outputs)), started, seconds, sum(len(item.rows) for item in batch))]

    def _run_rows(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """One model call for all parts, its output checked and split back per part."""
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        output = self._run_batch(rows)
        if len(output) != len(rows):
            raise RuntimeError(f"model returned {len(output)} rows for {len(rows)} inputs")
        if len(parts) == 1:
            return [output]
        return np.split(output, np.cumsum([len(part) for part in parts])[:-1])

    # --- on an instance thread ----------------------------------------------------------------

    def _work(self) -> None:
        """One model instance: run the jobs handed to it until told to stop (None)."""
        job: _Job | None = None
        reason = None
        _yield_to_the_loop()
        try:
            while (job := self._jobs.get()) is not None:
                job.started = time.monotonic()
                if job.batch:
                    job.computed = self._compute(job.batch)
                elif job.probe is not None:
                    self._run_batch(job.probe)
                job.finished = time.monotonic()
                self._post(self._job_done, job)
                job = None
        except BaseException as exc:  # not a bad request (those are caught per batch): the batcher is broken
            reason = f"batcher stopped: {type(exc).__name__}: {exc}"
            log.error("%s: model instance %s stopped unexpectedly", self._name, threading.current_thread().name,
                      exc_info=True)
        finally:
            self._post(self._worker_stopped, job, reason)


def _yield_to_the_loop() -> None:
    """Lower this instance thread's scheduling priority by :data:`INSTANCE_NICENESS` (Linux: per thread).

    When the instances keep every core busy, the event loop (health checks, metadata, new requests) must still
    get a core at once when it wakes; with equal priority it waits for the scheduler's next slice (the figures
    are in docs/performance.md).
    """
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(os.getpriority(os.PRIO_PROCESS, thread) + INSTANCE_NICENESS, 19))
    except OSError as exc:  # not allowed here: the instances run at the loop's priority
        log.debug("instance thread priority unchanged: %s", exc)


def _calibration_sizes(largest: int) -> list[int]:
    """1, 2, 4 ... up to and including ``largest``."""
    return sorted({1, largest, *(2**i for i in range(largest.bit_length()) if 2**i < largest)})
