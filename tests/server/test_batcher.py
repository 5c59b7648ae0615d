"""The dynamic batcher on its own: pure asyncio, a fake model gated by events, no network, no timed waits.

Most tests pin every batch to the instance threads (:class:`ThreadsOnly`), where a gated model can hold a
batch while the test goes on; the placement tests at the end give the batcher known or measured costs.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import numpy as np
import pytest

from convserve_server.batcher import BatchCosts, DynamicBatcher
from convserve_server.errors import DeadlineExpired, InvalidInput, ModelNotReady, Overloaded


class ModelCrash(BaseException):
    """Not an error in a request: something that breaks the model instance itself."""


class GatedModel:
    """Doubles column 0 of its input; records each call's rows and the calls in progress.

    While ``gate`` is clear, every call waits at it (on its worker thread); ``entered`` counts the calls
    that reached it.  A NaN row fails the call, as a bad input would; -1 crashes the instance.
    """

    def __init__(self, *, gated: bool = False) -> None:
        self.calls: list[list[float]] = []
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.inside = 0
        self.most_inside = 0
        self._lock = threading.Lock()
        self._entered = threading.Condition(self._lock)
        self.threads: set[str] = set()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.calls.append(rows[:, 0].tolist())
            self.threads.add(threading.current_thread().name)
            self._entered.notify_all()
        try:
            assert self.gate.wait(timeout=10), "the test never opened the gate"
            if (rows[:, 0] == -1).any():
                raise ModelCrash("the instance broke")
            if np.isnan(rows).any():
                raise ValueError("NaN reached the model")
            return rows[:, :1] * 2
        finally:
            with self._lock:
                self.inside -= 1

    def wait_inside(self, calls: int) -> None:
        """Block until ``calls`` calls are computing at once (from the test's thread, not the loop)."""
        with self._entered:
            assert self._entered.wait_for(lambda: self.inside >= calls, timeout=10), f"{self.inside} inside"


class DepthWatcher:
    """A BatchObserver that lets a test await the queue depth and count the model calls it was told of."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []  # (rows, requests)
        self._depth_changed = asyncio.Event()
        self.depth = 0

    def observe_batch(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
        self.batches.append((rows, len(queue_seconds)))

    def observe_queue_depth(self, requests: int) -> None:
        self.depth = requests
        self._depth_changed.set()

    async def depth_reaches(self, requests: int) -> None:
        while self.depth != requests:
            self._depth_changed.clear()
            await asyncio.wait_for(self._depth_changed.wait(), 10)


class ThreadsOnly(BatchCosts):
    """Costs under which every batch is dearer than a hand-off: it runs on an instance thread."""

    def cheaper_on_loop(self, rows: int) -> bool:
        return False


def rows(*values: float) -> np.ndarray:
    return np.array([[v] for v in values], dtype=np.float32)


async def started(model: GatedModel, **settings) -> tuple[DynamicBatcher, DepthWatcher]:
    watcher = DepthWatcher()
    batcher = DynamicBatcher(model, observer=watcher, **{"max_batch_size": 8, "costs": ThreadsOnly(), **settings})
    batcher.start()
    return batcher, watcher


async def busy(model: GatedModel, batcher: DynamicBatcher, first: np.ndarray, instances: int = 1) -> list[asyncio.Task]:
    """Submit ``first`` once per instance and return once every instance is computing (held at the gate)."""
    running = [asyncio.ensure_future(batcher.submit(first)) for _ in range(instances)]
    await asyncio.to_thread(model.wait_inside, instances)
    return running


async def end_of_turn() -> None:
    """Let the loop finish this turn and run what it scheduled for the next (the batcher's dispatch)."""
    for _ in range(2):
        await asyncio.sleep(0)


async def test_requests_of_one_loop_turn_reach_the_model_together_with_nothing_between():
    model = GatedModel(gated=True)
    batcher, _ = await started(model)
    together = [asyncio.ensure_future(batcher.submit(rows(value))) for value in (1, 2, 3)]
    await end_of_turn()
    # Block the loop's thread: if a timer, a task or a hold stood between the turn and the model, the model
    # would never be entered.
    model.wait_inside(1)
    model.gate.set()
    assert [float(r[0, 0]) for r in await asyncio.gather(*together)] == [2, 4, 6]
    assert model.calls == [[1, 2, 3]]
    await batcher.close()


async def test_with_a_queue_delay_a_full_batch_goes_at_once():
    model = GatedModel(gated=True)
    batcher, _ = await started(model, max_batch_size=2, max_queue_delay_s=3600)
    full = asyncio.ensure_future(batcher.submit(rows(3, 4)))
    await end_of_turn()
    model.wait_inside(1)
    model.gate.set()
    np.testing.assert_array_equal(await full, rows(6, 8))
    await batcher.close()


async def test_requests_queued_while_the_model_computes_form_the_next_batch_in_order():
    model = GatedModel(gated=True)
    batcher, watcher = await started(model, max_batch_size=64)
    first = await busy(model, batcher, rows(0))
    others = [asyncio.ensure_future(batcher.submit(rows(i, i + 0.5))) for i in range(1, 6)]
    await watcher.depth_reaches(5)
    model.gate.set()
    results = await asyncio.gather(*first, *others)
    assert model.calls == [[0], [1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5]]
    for i, result in enumerate(results[1:], start=1):
        np.testing.assert_array_equal(result, rows(2 * i, 2 * i + 1))
    assert watcher.batches == [(1, 1), (10, 5)]
    await batcher.close()


async def test_the_queue_delay_lets_a_batch_fill_and_a_full_one_goes_without_waiting_it_out():
    model = GatedModel()
    batcher, watcher = await started(model, max_batch_size=4, max_queue_delay_s=3600)
    results = []
    for value in range(3):  # one at a time: each waits in the queue for the next
        results.append(asyncio.ensure_future(batcher.submit(rows(value))))
        await watcher.depth_reaches(value + 1)
    # The fourth fills the batch. No wait for a depth of 4: an instance may take the batch before the depth
    # is reported, and the report then says 0.
    results.append(asyncio.ensure_future(batcher.submit(rows(3))))
    assert [float(r[0, 0]) for r in await asyncio.gather(*results)] == [0, 2, 4, 6]
    assert model.calls == [[0, 1, 2, 3]]
    await batcher.close()


async def test_the_queue_delay_ends_and_a_partial_batch_runs():
    model = GatedModel()
    batcher, _ = await started(model, max_batch_size=4, max_queue_delay_s=0.05)
    begun = time.monotonic()
    np.testing.assert_array_equal(await batcher.submit(rows(1)), rows(2))
    assert time.monotonic() - begun >= 0.05
    await batcher.close()


async def test_a_full_queue_refuses_at_once_and_the_accepted_requests_are_answered():
    model = GatedModel(gated=True)
    batcher, watcher = await started(model, max_batch_size=1, max_queue_size=2)
    running = await busy(model, batcher, rows(0))
    queued = [asyncio.ensure_future(batcher.submit(rows(i))) for i in (1, 2)]
    await watcher.depth_reaches(2)
    with pytest.raises(Overloaded, match="queue full"):
        await batcher.submit(rows(3))
    with pytest.raises(Overloaded):  # an oversized request needs room for all its chunks
        await batcher.submit(rows(4, 5))
    model.gate.set()
    assert [float(r[0, 0]) for r in await asyncio.gather(*running, *queued)] == [0, 2, 4]
    await batcher.close()


async def test_a_request_needing_more_chunks_than_the_queue_holds_is_invalid_even_when_idle():
    model = GatedModel()
    batcher, _ = await started(model, max_batch_size=2, max_queue_size=2)
    with pytest.raises(InvalidInput, match="at most 4 images"):
        await batcher.submit(np.zeros((5, 1), dtype=np.float32))
    assert model.calls == []
    assert len(await batcher.submit(np.zeros((4, 1), dtype=np.float32))) == 4
    await batcher.close()


async def test_an_oversized_request_is_split_into_batches_and_reassembled_in_order():
    model = GatedModel()
    batcher, _ = await started(model, max_batch_size=4)
    values = np.arange(11, dtype=np.float32)
    result = await batcher.submit(values[:, None])
    np.testing.assert_array_equal(result[:, 0], values * 2)
    assert model.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    await batcher.close()


async def test_expired_and_cancelled_requests_are_dropped_before_compute():
    model = GatedModel(gated=True)
    batcher, watcher = await started(model)
    running = await busy(model, batcher, rows(0))
    expired = asyncio.ensure_future(batcher.submit(rows(100), deadline=time.monotonic() - 1))
    cancelled = asyncio.ensure_future(batcher.submit(rows(200)))
    kept = asyncio.ensure_future(batcher.submit(rows(300)))
    await watcher.depth_reaches(3)
    cancelled.cancel()
    model.gate.set()
    await asyncio.gather(*running)
    with pytest.raises(DeadlineExpired):
        await expired
    assert float((await kept)[0, 0]) == 600
    assert cancelled.cancelled()
    assert model.calls == [[0], [300]]
    assert watcher.batches == [(1, 1), (1, 1)]  # the dropped ones are no model call's rows
    await batcher.close()


async def test_a_model_returning_the_wrong_row_count_fails_the_batch():
    calls: list[int] = []

    def short(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return batch[:1]

    batcher = DynamicBatcher(short, max_batch_size=8)
    batcher.start()
    with pytest.raises(RuntimeError, match="model returned 1 rows for 3 inputs"):
        await batcher.submit(rows(1, 2, 3))
    assert calls == [3]
    await batcher.close()


async def test_one_bad_request_fails_alone_and_its_batch_mates_are_answered():
    model = GatedModel(gated=True)
    batcher, watcher = await started(model)
    running = await busy(model, batcher, rows(0))
    good = asyncio.ensure_future(batcher.submit(rows(1)))
    bad = asyncio.ensure_future(batcher.submit(rows(float("nan"))))
    also_good = asyncio.ensure_future(batcher.submit(rows(3, 4)))
    await watcher.depth_reaches(3)
    model.gate.set()
    await asyncio.gather(*running)
    assert float((await good)[0, 0]) == 2
    np.testing.assert_array_equal(await also_good, rows(6, 8))
    with pytest.raises(ValueError, match="NaN"):
        await bad
    assert [len(call) for call in model.calls] == [1, 4, 1, 1, 2]  # then each alone, on the same path
    assert watcher.batches == [(1, 1), (1, 1), (2, 1)]  # the model calls that succeeded
    await batcher.close()


async def test_a_crashed_instance_fails_every_pending_request_and_refuses_new_ones():
    model = GatedModel(gated=True)
    batcher, watcher = await started(model)
    running = await busy(model, batcher, rows(-1))  # will crash the instance once the gate opens
    queued = [asyncio.ensure_future(batcher.submit(rows(i))) for i in (1, 2)]
    await watcher.depth_reaches(2)
    model.gate.set()
    for pending in (*running, *queued):
        with pytest.raises(ModelNotReady, match="batcher stopped: ModelCrash: the instance broke"):
            await pending
    assert not batcher.running
    with pytest.raises(ModelNotReady, match="batcher stopped"):
        await batcher.submit(rows(3))
    await batcher.close()  # returns: the crashed instance is already gone
    assert model.calls == [[-1]]


async def test_close_answers_every_queued_request_then_refuses_new_ones():
    model = GatedModel(gated=True)
    batcher, watcher = await started(model, max_batch_size=1)
    accepted = await busy(model, batcher, rows(0))
    accepted += [asyncio.ensure_future(batcher.submit(rows(i))) for i in (1, 2)]
    await watcher.depth_reaches(2)
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0)  # one turn of the loop: close() runs up to its await
    with pytest.raises(ModelNotReady, match="draining"):
        await batcher.submit(rows(9))
    assert not closing.done()
    model.gate.set()
    await closing
    assert all(task.done() for task in accepted)  # answered before close returned
    assert [float(r[0, 0]) for r in await asyncio.gather(*accepted)] == [0, 2, 4]
    assert not batcher.running


async def test_close_ends_a_queue_delay_early_and_stops_every_instance():
    model = GatedModel()
    batcher, watcher = await started(model, instances=3, max_queue_delay_s=3600)
    accepted = [asyncio.ensure_future(batcher.submit(rows(i))) for i in (1, 2)]
    await watcher.depth_reaches(2)  # one instance waits for the batch to fill, two for work
    await asyncio.wait_for(batcher.close(), 10)
    assert [float(r[0, 0]) for r in await asyncio.gather(*accepted)] == [2, 4]
    assert model.calls == [[1, 2]]


@pytest.mark.parametrize("instances", [1, 3])
async def test_n_instances_compute_n_batches_at_once_each_on_its_own_thread(instances):
    model = GatedModel(gated=True)
    batcher, watcher = await started(model, max_batch_size=2, instances=instances)
    running = await busy(model, batcher, rows(0, 1), instances)
    assert model.inside == instances
    behind = [asyncio.ensure_future(batcher.submit(rows(i))) for i in range(2, 5)]
    await watcher.depth_reaches(3)  # every instance is busy: the rest queue
    model.gate.set()
    results = await asyncio.gather(*running, *behind)
    await batcher.close()
    assert [r[:, 0].tolist() for r in results] == [[0, 2]] * instances + [[4], [6], [8]]
    assert model.most_inside == instances
    assert len(model.threads) == min(instances, len(model.calls))
    assert threading.current_thread().name not in model.threads  # never on the loop's thread
    assert sorted(model.calls[instances:]) == [[2, 3], [4]]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1"):
        DynamicBatcher(lambda b: b, max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue_size"):
        DynamicBatcher(lambda b: b, max_batch_size=1, max_queue_size=0)
    with pytest.raises(ValueError, match="instances must be an integer >= 1"):
        DynamicBatcher(lambda b: b, max_batch_size=1, instances=0)
    with pytest.raises(ValueError, match="max_queue_delay_s"):
        DynamicBatcher(lambda b: b, max_batch_size=1, max_queue_delay_s=-1)


async def test_a_batcher_not_started_refuses_requests():
    with pytest.raises(ModelNotReady):
        await DynamicBatcher(lambda b: b, max_batch_size=1).submit(rows(1))


# --- where a batch runs -------------------------------------------------------------------------


async def test_a_batch_cheaper_than_a_hand_off_runs_on_the_event_loop():
    model = GatedModel()
    batcher, watcher = await started(model, costs=BatchCosts(handoff_s=1e-3, compute_s={1: 1e-6, 8: 8e-6}))
    results = await asyncio.gather(*(batcher.submit(rows(value)) for value in (1, 2, 3)))
    assert [float(r[0, 0]) for r in results] == [2, 4, 6]
    assert model.calls == [[1, 2, 3]]
    assert model.threads == {threading.current_thread().name}
    assert watcher.batches == [(3, 3)]
    await batcher.close()


async def test_a_batch_dearer_than_a_hand_off_runs_on_a_thread_while_the_loop_stays_free():
    model = GatedModel(gated=True)
    batcher, _ = await started(model, costs=BatchCosts(handoff_s=1e-4, compute_s={1: 0.02}))
    dear = asyncio.ensure_future(batcher.submit(rows(5)))
    await asyncio.to_thread(model.wait_inside, 1)  # the loop runs on while the model holds its batch
    assert not dear.done()
    model.gate.set()
    assert float((await dear)[0, 0]) == 10
    assert threading.current_thread().name not in model.threads
    await batcher.close()


class ThreadGatedModel(GatedModel):
    """Holds calls at the gate on instance threads only; calls on the loop's thread pass at once."""

    def __init__(self) -> None:
        super().__init__(gated=True)
        self.loop_thread = threading.current_thread().name

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if threading.current_thread().name == self.loop_thread:
            with self._lock:
                self.calls.append(rows[:, 0].tolist())
                self.threads.add(self.loop_thread)
            return rows[:, :1] * 2
        return super().__call__(rows)


async def test_a_cheap_batch_runs_on_the_loop_while_an_instance_is_busy_with_a_dear_one():
    model = ThreadGatedModel()
    costs = BatchCosts(handoff_s=1e-3, compute_s={1: 1e-6, 2: 1.0})
    batcher, _ = await started(model, max_batch_size=2, costs=costs)
    dear = asyncio.ensure_future(batcher.submit(rows(1, 2)))
    await asyncio.to_thread(model.wait_inside, 1)  # the dear batch holds an instance thread at the gate
    assert float((await batcher.submit(rows(7)))[0, 0]) == 14  # answered while the dear one still computes
    assert not dear.done()
    model.gate.set()
    np.testing.assert_array_equal(await dear, rows(2, 4))
    assert model.calls == [[1, 2], [7]]
    assert len(model.threads) == 2 and model.loop_thread in model.threads
    await batcher.close()


async def test_a_crash_on_the_event_loop_stops_the_batcher_and_fails_its_requests():
    model = GatedModel()
    batcher, _ = await started(model, costs=BatchCosts(handoff_s=1e-3, compute_s={1: 1e-6}))
    with pytest.raises(ModelNotReady, match="batcher stopped: ModelCrash"):
        await batcher.submit(rows(-1))
    assert not batcher.running
    with pytest.raises(ModelNotReady, match="batcher stopped"):
        await batcher.submit(rows(1))
    await asyncio.wait_for(batcher.close(), 10)


class SleepingModel:
    """A model whose every call takes ``seconds`` (off the loop, a thread's sleep is what a busy model looks
    like to the loop); records the threads it ran on."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.threads: set[str] = set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        if self.seconds:
            time.sleep(self.seconds)
        return batch[:, :1] * 2


@pytest.mark.parametrize("seconds, on_loop", [(0.0, True), (0.2, False)])
async def test_calibration_measures_the_model_and_the_hand_off_and_places_batches_by_them(seconds, on_loop):
    model = SleepingModel(seconds)
    batcher = DynamicBatcher(model, max_batch_size=1)
    batcher.start()
    assert not batcher.costs.cheaper_on_loop(1)  # nothing measured: nothing assumed cheap
    await batcher.calibrate(np.zeros((1, 1), dtype=np.float32))
    assert batcher.costs.handoff_s is not None and batcher.costs.handoff_s > 0
    assert batcher.costs.expected_compute_s(1) >= seconds
    model.threads.clear()
    assert float((await batcher.submit(rows(4)))[0, 0]) == 8
    assert (threading.current_thread().name in model.threads) is on_loop
    await batcher.close()


def test_costs_are_interpolated_between_measured_sizes_and_follow_new_measurements():
    costs = BatchCosts(handoff_s=1e-3, compute_s={1: 1e-4, 4: 4e-4})
    assert costs.expected_compute_s(2) == pytest.approx(2e-4)
    assert costs.expected_compute_s(8) == pytest.approx(8e-4)  # beyond the largest: in proportion
    assert costs.cheaper_on_loop(4) and not costs.cheaper_on_loop(16)
    for _ in range(10):  # the model got slow: the estimate follows within a few batches
        costs.observe_compute(4, 0.02)
    assert not costs.cheaper_on_loop(4)
    assert BatchCosts().expected_compute_s(1) is None


async def test_requests_are_refused_until_calibration_is_done():
    model = SleepingModel(0.01)
    batcher = DynamicBatcher(model, max_batch_size=1)
    batcher.start()
    calibrating = asyncio.ensure_future(batcher.calibrate(np.zeros((1, 1), dtype=np.float32)))
    await asyncio.sleep(0)
    assert not batcher.running
    with pytest.raises(ModelNotReady, match="warming up"):
        await batcher.submit(rows(1))
    await calibrating
    assert batcher.running and float((await batcher.submit(rows(2)))[0, 0]) == 4
    await batcher.close()


async def test_a_close_during_calibration_ends_it_and_stops_every_instance():
    model = SleepingModel(0.01)
    batcher = DynamicBatcher(model, max_batch_size=1, instances=2)
    batcher.start()
    calibrating = asyncio.ensure_future(batcher.calibrate(np.zeros((1, 1), dtype=np.float32)))
    await asyncio.sleep(0)
    await asyncio.wait_for(batcher.close(), 10)
    with pytest.raises(ModelNotReady):
        await asyncio.wait_for(calibrating, 10)


async def test_an_instance_that_breaks_during_calibration_fails_it_instead_of_hanging():
    def crashing(batch: np.ndarray) -> np.ndarray:
        if threading.current_thread().name.startswith("model-instance"):
            raise ModelCrash("the instance broke")
        return batch

    batcher = DynamicBatcher(crashing, max_batch_size=1)
    batcher.start()
    with pytest.raises(ModelNotReady, match="ModelCrash"):
        await asyncio.wait_for(batcher.calibrate(np.zeros((1, 1), dtype=np.float32)), 10)
    assert not batcher.running
    await asyncio.wait_for(batcher.close(), 10)


def test_a_hand_off_counts_for_at_most_the_switch_interval():
    costs = BatchCosts(compute_s={1: 0.02})
    costs.observe_handoff(0.7)  # a starved thread on a loaded host: not the hand-off's own cost
    assert costs.handoff_s == pytest.approx(sys.getswitchinterval())
    assert not costs.cheaper_on_loop(1)  # a 20 ms batch never runs on the loop
