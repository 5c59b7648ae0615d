"""The dynamic batcher: one asyncio task that groups queued requests into model calls.

When the model is idle, whatever is queued runs at once, so a lone request
waits for nothing; while a batch computes, new requests queue and the next
batch takes them all, so batches grow with load up to ``max_batch_size``.
An optional queue delay lets a batch wait to fill.  A batch expected to take
less than ``inline_budget_s`` (from the measured time per row) runs on the
event-loop thread itself: for a few images on the CPU, handing the call to the
worker thread and waking the loop again costs more than the model call.  Longer
batches run on the worker thread, so the loop keeps admitting, queueing and
refusing requests while the model computes.  When a full batch is already
queued while one computes, it is handed to the worker at once, so the model
runs batches back to back instead of idling while the loop wakes to send the
next (it could not grow anyway); a request whose deadline passes or whose
caller gives up meanwhile is still dropped before compute.  With several model
``instances`` (worker threads), full batches start on each while the others
compute, and one more waits behind them.

A request that finds the model idle, nothing queued, no queue delay set and
its compute within the inline budget is run by its caller at once: waking the
batching task and then the caller again would cost more than the model call.
Under load, a :class:`LoadAwareHold` lets such a request wait briefly for
others instead, as long as those waits keep gathering several requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from convserve_server.errors import DeadlineExpired, ModelNotReady, Overloaded

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    """Receives the batcher's measurements (the server's metrics implement it)."""

    def observe_batch(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
        """One model call: its size, how long each request queued, how long it ran."""

    def observe_queue_depth(self, requests: int) -> None:
        """The number of queued requests changed."""


class LoadAwareHold:
    """Decides when batches should wait ``hold_s`` for more requests, as a fixed queue delay would.

    Waiting pays only under load: while callers send requests faster than a hold
    lasts, a hold gathers several into one model call, and one call for many
    requests costs far less than one each.  A lone caller's next request comes
    only after its answer, so a hold would gather nothing and only add latency.
    Hence holds are tried only when the previous request arrived within
    ``hold_s``, end early once arrivals pause for twice their usual gap, and are
    kept while they gather at least :attr:`PAYS_AT` requests and more requests
    arrive while the held batch computes.  If none do, every caller was waiting
    on that batch: the hold made them take turns in lockstep, which costs a few
    callers more than batching saves them.  After a hold that did not pay, the
    next 1, 2, 4 ... up to :attr:`MAX_SKIP` chances pass before another try, so
    at low load about one request in a thousand waits.  Held batches compute on
    the worker thread, so that the loop admits requests meanwhile.
    """

    PAYS_AT = 4  # fewer means a handful of callers, for whom the wait costs more than batching saves
    MAX_SKIP = 1024

    def __init__(self, hold_s: float) -> None:
        if hold_s < 0:
            raise ValueError("hold_s must be >= 0")
        self.hold_s = hold_s
        self.holding = False
        self._last_arrival = float("-inf")
        self._usual_gap = hold_s
        self._skip_next = 0
        self._backoff = 0

    def on_arrival(self, now: float) -> bool:
        """Record an arrival; True if its batch should hold."""
        gap = now - self._last_arrival
        self._last_arrival = now
        if gap < self.hold_s:
            self._usual_gap = 0.9 * self._usual_gap + 0.1 * gap
        if self.holding or self.hold_s <= 0 or gap >= self.hold_s:
            return self.holding
        if self._skip_next > 0:
            self._skip_next -= 1
            return False
        self.holding = True
        return True

    @property
    def pause_s(self) -> float:
        """A wait this long with no arrival means the callers have all sent: stop holding this batch."""
        return 2 * self._usual_gap

    def judge(self, gathered: int, arrived_meanwhile: bool) -> None:
        """A held batch of ``gathered`` requests computed; did others arrive meanwhile?"""
        if gathered >= self.PAYS_AT and arrived_meanwhile:
            self._backoff = 0
            return
        self.holding = False
        self._backoff = min(max(1, 2 * self._backoff), self.MAX_SKIP)
        self._skip_next = self._backoff


@dataclass(eq=False)
class _Pending:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    deadline: float | None
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class _Run:
    """What one model call did: the requests it computed (the others had expired) and when."""

    live: list[_Pending]
    outputs: list[np.ndarray]
    started: float
    seconds: float


class DynamicBatcher:
    """Batches calls of ``run_batch`` (rows in, rows out) across concurrent callers.

    ``run_under_load``, if given, replaces ``run_batch`` for a batch run while
    the server is busy (one queued on the worker behind another, or held to
    gather requests under load): the model may then do better leaving a core to
    the loop (see ``OnnxModel.run_under_load``).  ``instances`` batches may
    compute at once, so ``executor`` should have that many threads, and both
    callables must be safe to call from that many threads at once.
    """

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        executor: Executor,
        *,
        run_under_load: Callable[[np.ndarray], np.ndarray] | None = None,
        max_batch_size: int,
        instances: int = 1,
        max_queue_delay_s: float = 0.0,
        max_queue_size: int = 1024,
        inline_budget_s: float = 0.0,
        hold_under_load_s: float = 0.0,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be an integer >= 1")
        if instances < 1:
            raise ValueError("instances must be an integer >= 1")
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be an integer >= 1")
        if max_queue_delay_s < 0:
            raise ValueError("max_queue_delay_s must be >= 0")
        if inline_budget_s < 0:
            raise ValueError("inline_budget_s must be >= 0")
        self._run_batch = run_batch
        self._run_under_load = run_under_load or run_batch
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._instances = instances  # batches that may compute at once; the executor has as many threads
        self._max_queue_delay_s = max_queue_delay_s
        self._max_queue_size = max_queue_size
        self._inline_budget_s = inline_budget_s
        self._seconds_per_row: float | None = None  # moving average of measured compute time
        self._observer = observer
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._computing = 0  # batches taken and not yet answered (inline or on the worker)
        self._on_worker = 0  # batches handed to the worker whose model call has not returned
        self._arrivals = 0  # requests queued so far
        # With a fixed queue delay every batch waits anyway; the load-aware hold is for delay 0.
        self._hold = LoadAwareHold(0.0 if max_queue_delay_s > 0 else hold_under_load_s)
        self._arrived = asyncio.Event()
        self._worker_wake = asyncio.Event()  # a worker batch finished, or a full batch is queued
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model."""
        return len(self._queue)

    def start(self) -> None:
        """Start the batching task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="convserve-batcher")
            self._task.add_done_callback(self._fail_pending_if_crashed)

    async def close(self) -> None:
        """Refuse new requests, answer every queued one, then stop."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await asyncio.shield(self._task)

    async def submit(self, rows: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Queue ``rows`` and await their results; larger requests are split and reassembled in order.

        ``deadline`` is a ``time.monotonic()`` instant after which the request
        is dropped before compute.  Raises Overloaded when the queue is full.
        """
        if self._closing or self._task is None:
            raise ModelNotReady("server is draining; not accepting new requests")
        if not self._hold.on_arrival(time.monotonic()) and self._may_run_now(len(rows)):
            return self._run_now(rows, deadline)
        chunks = [rows[start : start + self._max_batch_size] for start in range(0, len(rows), self._max_batch_size)]
        if len(self._queue) + len(chunks) > self._max_queue_size:
            raise Overloaded(f"queue full ({self._max_queue_size} requests waiting); retry later")
        loop = asyncio.get_running_loop()
        pending = [_Pending(chunk, loop.create_future(), deadline) for chunk in chunks]
        self._queue.extend(pending)
        self._queued_rows += len(rows)
        self._arrivals += 1
        self._arrived.set()
        if self._queued_rows >= self._max_batch_size:
            self._worker_wake.set()
        self._report_depth()
        if len(pending) == 1:
            return await pending[0].future
        results = await asyncio.gather(*(item.future for item in pending))
        return np.concatenate(results)

    def _may_run_now(self, rows: int) -> bool:
        return (not self._queue and not self._computing and self._max_queue_delay_s == 0
                and rows <= self._max_batch_size and self._fits_inline(rows))

    def _run_now(self, rows: np.ndarray, deadline: float | None) -> np.ndarray:
        """Run a lone request in its caller's task; nothing else can start meanwhile (no await)."""
        started = time.monotonic()
        if deadline is not None and started >= deadline:
            raise DeadlineExpired("deadline passed before compute")
        output = self._run_rows([rows], self._run_batch)[0]
        self._finished(len(rows), [0.0], time.monotonic() - started)
        return output

    def _finished(self, rows: int, queue_seconds: list[float], seconds: float) -> None:
        self._learn_speed(rows, seconds)
        if self._observer is not None:
            self._observer.observe_batch(rows, queue_seconds, seconds)

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.observe_queue_depth(len(self._queue))

    async def _loop(self) -> None:
        tasks: set[asyncio.Task[None]] = set()  # batches handed to the worker and not yet answered
        while True:
            for task in [task for task in tasks if task.done()]:
                tasks.discard(task)
                task.result()  # re-raises a failure, so that the batcher stops loudly
            full_batch_queued = self._queued_rows >= self._max_batch_size
            if self._on_worker and not (full_batch_queued and self._on_worker <= self._instances):
                # Let the next batch grow while others compute; a full one starts on a free instance, or
                # waits behind the busy ones, at once.
                self._worker_wake.clear()
                await self._worker_wake.wait()
                continue
            batch, held = await self._next_batch()
            if not batch:
                if self._closing and not self._queue:
                    await asyncio.gather(*tasks)
                    return
                continue
            # Inline only when nothing else computes: not even a failed batch's culprit search on the worker.
            inline = not self._computing and not held and self._fits_inline(sum(len(item.rows) for item in batch))
            self._computing += 1
            if inline:
                try:
                    await self._answer(batch, self._run_here(batch))
                finally:
                    self._computing -= 1
                continue
            self._on_worker += 1
            tasks.add(asyncio.get_running_loop().create_task(
                self._compute_on_worker(batch, held, under_load=held or self._on_worker > 1)))

    async def _compute_on_worker(self, batch: list[_Pending], held: bool, under_load: bool) -> None:
        arrivals = self._arrivals
        try:
            try:
                run = await self._run_on_worker(batch, under_load)
            finally:
                # Wake the loop before answering: it takes the next batch before the replies go out.
                self._on_worker -= 1
                self._worker_wake.set()
            await self._answer(batch, run)
        finally:
            self._computing -= 1
        if held:
            self._hold.judge(len(batch), arrived_meanwhile=self._arrivals > arrivals)

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _next_batch(self) -> tuple[list[_Pending], bool]:
        """The next batch, and whether it was held for more requests."""
        while not self._queue:
            if self._closing:
                return [], False
            await self._wait_for_arrival(None)
        held = self._hold.holding  # decided by the arrivals, so read only once one has come
        delay = self._max_queue_delay_s or (self._hold.hold_s if held else 0.0)
        if delay > 0:
            fill_by = time.monotonic() + delay
            while self._queued_rows < self._max_batch_size and not self._closing:
                remaining = fill_by - time.monotonic()
                if held:
                    remaining = min(remaining, self._hold.pause_s)
                if remaining <= 0 or not await self._wait_for_arrival(remaining):
                    break
        return self._take_batch(), held

    def _take_batch(self) -> list[_Pending]:
        """Pop queued requests that fit in one batch, dropping cancelled and expired ones."""
        batch: list[_Pending] = []
        rows = 0
        now = time.monotonic()
        while self._queue and rows + len(self._queue[0].rows) <= self._max_batch_size:
            item = self._queue.popleft()
            self._queued_rows -= len(item.rows)
            if item.future.done():  # the caller cancelled
                continue
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(DeadlineExpired("deadline passed while queued"))
                continue
            batch.append(item)
            rows += len(item.rows)
        self._report_depth()
        return batch

    def _run_here(self, batch: list[_Pending]) -> _Run | Exception:
        """Run a batch on the loop's thread; a failure is returned, for :meth:`_answer`."""
        try:
            return self._run_live(batch, under_load=False)
        except Exception as exc:
            return exc

    async def _run_on_worker(self, batch: list[_Pending], under_load: bool) -> _Run | Exception:
        """Run a batch on the worker thread; a failure is returned, for :meth:`_answer`."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._run_live, batch, under_load)
        except Exception as exc:
            return exc

    async def _answer(self, batch: list[_Pending], run: _Run | Exception) -> None:
        """Settle each caller's future; a failed batch is re-run request by request."""
        if isinstance(run, Exception):
            if len(batch) > 1:
                # Find the culprit: run each request alone so one bad input fails only its caller.
                for item in batch:
                    await self._answer([item], await self._run_on_worker([item], under_load=False))
            else:
                _settle(batch[0].future, exc=run)
            return
        if len(run.live) < len(batch):
            for item in set(batch).difference(run.live):
                _settle(item.future, exc=DeadlineExpired("deadline passed while queued"))
        if run.live:
            self._finished(sum(len(item.rows) for item in run.live),
                           [run.started - item.enqueued for item in run.live], run.seconds)
        for item, output in zip(run.live, run.outputs):
            _settle(item.future, result=output)

    def _run_live(self, batch: list[_Pending], under_load: bool) -> _Run:
        """On the computing thread: run the requests still awaited whose deadline has not passed (a batch
        may have waited behind another on the worker since it was taken)."""
        started = time.monotonic()
        # Reading a future's state from the worker thread is safe (a read under the GIL); at worst it sees a
        # cancellation a moment late, and the request is computed and its answer discarded.
        live = [item for item in batch
                if not item.future.done() and (item.deadline is None or started < item.deadline)]
        run_batch = self._run_under_load if under_load else self._run_batch
        outputs = self._run_rows([item.rows for item in live], run_batch) if live else []
        return _Run(live, outputs, started, time.monotonic() - started)

    def _fits_inline(self, rows: int) -> bool:
        if self._inline_budget_s <= 0 or self._seconds_per_row is None:
            return False
        return rows * self._seconds_per_row <= self._inline_budget_s

    def _learn_speed(self, rows: int, seconds: float) -> None:
        per_row = seconds / rows
        previous = self._seconds_per_row
        self._seconds_per_row = per_row if previous is None else 0.8 * previous + 0.2 * per_row

    @staticmethod
    def _run_rows(parts: list[np.ndarray], run_batch: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
        """One model call for all parts, split back per part."""
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        output = run_batch(rows)
        if len(output) != len(rows):
            raise RuntimeError(f"model returned {len(output)} rows for {len(rows)} inputs")
        if len(parts) == 1:
            return [output]
        bounds = np.cumsum([len(part) for part in parts])[:-1]
        return np.split(output, bounds)

    def _fail_pending_if_crashed(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("batcher stopped unexpectedly", exc_info=task.exception())
        self._closing = True
        while self._queue:
            _settle(self._queue.popleft().future, exc=ModelNotReady("batcher stopped; request not computed"))


def _settle(future: asyncio.Future[np.ndarray], *, result: np.ndarray | None = None, exc: BaseException | None = None) -> None:
    if future.done():  # cancelled by its caller meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]
