"""The dynamic batcher, with Triton's semantics, on one execution path.

Requests join one bounded queue (full: :class:`Overloaded`); a request larger
than ``max_batch_size`` rows joins it as several chunks, answered together and
in order.  Each model instance has its own worker thread, the consumer: it
takes up to ``max_batch_size`` rows from the head of the queue, dropping
requests whose deadline passed or whose caller gave up, runs the model and
hands the answers back to the event loop.  With ``max_queue_delay_s`` set, it
first waits until that long after the oldest queued request arrived for a full
batch; without, it takes what is queued at once, so a lone request on an idle
model waits for nothing, and under load batches grow by themselves with what
queued while the instances computed.

Only one instance at a time waits for a batch to fill; a request wakes one
instance (none while all compute), and an instance leaving requests behind
wakes the next, so N busy instances compute N batches and the queue fills
behind them.  The loop's side is a future per request, a lock, and one
callback per batch: no task is created per request or per batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from convserve_server.errors import DeadlineExpired, InvalidInput, ModelNotReady, Overloaded

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    """Receives the batcher's measurements on the event loop's thread (the server's metrics implement it)."""

    def observe_batch(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
        """One model call: its size, how long each request queued, how long it ran."""

    def observe_queue_depth(self, requests: int) -> None:
        """The number of queued requests changed."""


@dataclass(eq=False)
class _Pending:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    deadline: float | None
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Batches calls of ``run_batch`` (rows in, rows out) across concurrent callers.

    ``instances`` worker threads may call ``run_batch`` at once, so it must be
    safe to call from that many threads (an ONNX Runtime session is).
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
        self._queue: deque[_Pending] = deque()  # shared with the workers: changed under _lock only
        self._queued_rows = 0
        self._lock = threading.RLock()
        self._has_work = threading.Condition(self._lock)  # idle instances wait here for requests
        self._grew = threading.Condition(self._lock)  # the one instance waiting for a batch to fill waits here
        self._filling = False  # an instance is waiting up to the queue delay for a full batch
        self._closing = False
        self._stopped_reason: str | None = None  # set when a worker died: the batcher refuses everything
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = 0  # worker threads alive; read and changed on the loop's thread
        self._stopped: asyncio.Future[None] | None = None

    @property
    def queue_depth(self) -> int:
        """Requests (or chunks of oversized ones) waiting for a model instance."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        """Started, not closed, and no worker has died."""
        return self._loop is not None and not self._closing

    def start(self) -> None:
        """Start one worker thread per instance; answers go back to the running loop."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopped = self._loop.create_future()
        self._running = self._instances
        for index in range(self._instances):
            threading.Thread(target=self._work, name=f"{self._name}-instance-{index}", daemon=True).start()

    async def close(self) -> None:
        """Refuse new requests, answer every queued one, then stop the workers."""
        with self._lock:
            self._closing = True
            self._wake_all()
        if self._stopped is not None:
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
        size = self._max_batch_size
        self._check_fits(len(rows))
        if len(rows) <= size:
            pending = [_Pending(rows, loop.create_future(), deadline)]
        else:
            pending = [_Pending(rows[start : start + size], loop.create_future(), deadline)
                       for start in range(0, len(rows), size)]
        with self._lock:
            if len(self._queue) + len(pending) > self._max_queue_size:
                raise Overloaded(f"queue full ({self._max_queue_size} requests waiting); retry later")
            self._queue.extend(pending)
            self._queued_rows += len(rows)
            # Wake one instance only: the one filling a batch, else an idle one (none if all compute).
            (self._grew if self._filling else self._has_work).notify()
        self._report_depth()
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

    # --- on the loop's thread: answers from the workers ---------------------------------------

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.observe_queue_depth(len(self._queue))

    def _answer(self, batch: list[_Pending], outputs: list[np.ndarray], started: float, seconds: float) -> None:
        """Settle the futures of one model call."""
        for item, output in zip(batch, outputs):
            if not item.future.done():  # else its caller gave up while it computed
                item.future.set_result(output)
        self._report_depth()
        if self._observer is not None:
            self._observer.observe_batch(sum(len(item.rows) for item in batch),
                                         [started - item.enqueued for item in batch], seconds)

    def _fail(self, items: list[_Pending], error: BaseException) -> None:
        """Fail the futures of requests that were not, or could not be, computed."""
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)
        self._report_depth()

    def _worker_stopped(self, reason: str | None) -> None:
        if reason is not None and self._stopped_reason is None:
            self._stopped_reason = reason
            self._fail_queued(reason)
        self._running -= 1
        if self._running == 0 and self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def _fail_queued(self, reason: str) -> None:
        with self._lock:
            self._closing = True
            failed = list(self._queue)
            self._queue.clear()
            self._queued_rows = 0
            self._wake_all()
        self._fail(failed, ModelNotReady(reason))

    def _post(self, callback: Callable[..., object], *args: object) -> None:
        """Run ``callback(*args)`` on the loop's thread (from a worker)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody awaits these answers any more
            pass

    # --- on a worker thread -------------------------------------------------------------------

    def _work(self) -> None:
        """One model instance: form a batch, run it, hand the answers to the loop; until closed and drained."""
        batch: list[_Pending] | None = []
        reason = None
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                if batch:
                    self._compute(batch)
                batch = []
        except BaseException as exc:  # not a bad request (those are caught per batch): the batcher is broken
            reason = f"batcher stopped: {type(exc).__name__}: {exc}"
            log.error("%s: model instance %s stopped unexpectedly", self._name, threading.current_thread().name,
                      exc_info=True)
            self._post(self._fail, batch or [], ModelNotReady(reason))
        finally:
            self._post(self._worker_stopped, reason)

    def _wake_all(self) -> None:
        """Wake every waiting instance (closing); called with the lock held."""
        self._has_work.notify_all()
        self._grew.notify_all()

    def _next_batch(self) -> list[_Pending] | None:
        """The next batch to run (empty when all taken had expired or were cancelled); None once closed and
        drained.  Only one instance at a time waits for a batch to fill; the others wait for work."""
        with self._lock:
            while not self._queue or self._filling:
                if self._closing and not self._queue:
                    return None
                self._has_work.wait()
            if self._max_queue_delay_s > 0 and not self._closing:
                self._filling = True
                try:
                    fill_by = self._queue[0].enqueued + self._max_queue_delay_s
                    while self._queued_rows < self._max_batch_size and not self._closing:
                        remaining = fill_by - time.monotonic()
                        if remaining <= 0:
                            break
                        self._grew.wait(remaining)
                finally:
                    self._filling = False
            batch = self._take()
            if self._closing:  # the others may wait behind this one's filling: let them see the queue now
                self._has_work.notify_all()
            elif self._queue:  # more than one batch was queued: an idle instance takes the next
                self._has_work.notify()
            return batch

    def _take(self) -> list[_Pending]:
        """Pop up to ``max_batch_size`` rows from the queue's head; fail expired requests, skip cancelled ones.
        Called with the lock held."""
        batch: list[_Pending] = []
        expired: list[_Pending] = []
        cancelled = False
        rows = 0
        now = time.monotonic()
        queue = self._queue
        while queue and rows + len(queue[0].rows) <= self._max_batch_size:
            item = queue.popleft()
            self._queued_rows -= len(item.rows)
            # A future read from this thread: at worst a cancellation is seen late and its answer discarded.
            if item.future.done():
                cancelled = True
                continue
            if item.deadline is not None and now >= item.deadline:
                expired.append(item)
                continue
            batch.append(item)
            rows += len(item.rows)
        if expired:
            self._post(self._fail, expired, DeadlineExpired("deadline passed while queued"))
        elif cancelled and not batch:  # nothing else will report the queue's new depth
            self._post(self._report_depth)
        return batch

    def _compute(self, batch: list[_Pending]) -> None:
        """Run one batch; if it fails, run each request alone, so that only a bad one fails."""
        started = time.monotonic()
        try:
            outputs = self._run_rows([item.rows for item in batch])
        except Exception as exc:
            if len(batch) == 1:
                self._post(self._fail, batch, exc)
                return
            log.warning("%s: a batch of %d requests failed (%s); running each alone", self._name, len(batch), exc)
            for item in batch:
                self._compute([item])
            return
        self._post(self._answer, batch, outputs, started, time.monotonic() - started)

    def _run_rows(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """One model call for all parts, its output checked and split back per part."""
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        output = self._run_batch(rows)
        if len(output) != len(rows):
            raise RuntimeError(f"model returned {len(output)} rows for {len(rows)} inputs")
        if len(parts) == 1:
            return [output]
        return np.split(output, np.cumsum([len(part) for part in parts])[:-1])
