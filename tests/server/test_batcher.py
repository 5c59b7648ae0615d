"""The dynamic batcher on its own: pure asyncio, a fake model gated by events, no network."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from convserve_server.batcher import DynamicBatcher, LoadAwareHold
from convserve_server.errors import DeadlineExpired, ModelNotReady, Overloaded


class GatedModel:
    """Doubles its input; each call records its batch and can be held until released."""

    def __init__(self, hold: bool = False) -> None:
        self.calls: list[np.ndarray] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.release.wait(timeout=10)
        self.calls.append(rows.copy())
        if np.isnan(rows).any():
            raise ValueError("NaN reached the model")
        return rows[:, :1] * 2


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def rows(*values: float) -> np.ndarray:
    return np.array([[v] for v in values], dtype=np.float32)


async def wait_until(predicate, timeout: float = 5.0) -> None:
    """Poll a condition owned by another thread (the model's worker)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def busy_batcher(executor, first: np.ndarray, **settings) -> tuple[GatedModel, DynamicBatcher, asyncio.Future]:
    """A started batcher whose model is computing ``first`` and held there until ``model.release`` is set."""
    model = GatedModel(hold=True)
    batcher = DynamicBatcher(model, executor, **settings)
    batcher.start()
    running = asyncio.ensure_future(batcher.submit(first))
    await wait_until(model.entered.is_set)
    return model, batcher, running


async def test_lone_request_runs_at_once_without_waiting(executor):
    model = GatedModel()
    batcher = DynamicBatcher(model, executor, max_batch_size=8)
    batcher.start()
    result = await batcher.submit(rows(1, 2))
    np.testing.assert_array_equal(result, rows(2, 4))
    assert len(model.calls) == 1
    await batcher.close()


async def test_requests_queued_while_model_busy_form_one_batch_in_order(executor):
    model, batcher, first = await busy_batcher(executor, rows(0), max_batch_size=64)
    others = [asyncio.ensure_future(batcher.submit(rows(i, i + 0.5))) for i in range(1, 6)]
    await wait_until(lambda: batcher.queue_depth == 5)
    model.release.set()
    results = await asyncio.gather(first, *others)
    assert len(model.calls) == 2, "the five queued requests must share one model call"
    assert len(model.calls[1]) == 10
    for i, result in enumerate(results[1:], start=1):
        np.testing.assert_array_equal(result, rows(2 * i, 2 * i + 1))
    await batcher.close()


async def test_batches_never_exceed_max_and_large_requests_are_split_and_reassembled(executor):
    model = GatedModel()
    batcher = DynamicBatcher(model, executor, max_batch_size=4)
    batcher.start()
    values = np.arange(11, dtype=np.float32)
    result = await batcher.submit(values[:, None])
    np.testing.assert_array_equal(result[:, 0], values * 2)
    assert [len(call) for call in model.calls] == [4, 4, 3]
    await batcher.close()


async def test_queue_delay_lets_a_batch_fill(executor):
    model = GatedModel()
    batcher = DynamicBatcher(model, executor, max_batch_size=4, max_queue_delay_s=5.0)
    batcher.start()
    started = time.monotonic()
    results = await asyncio.gather(*(batcher.submit(rows(i)) for i in range(4)))
    assert time.monotonic() - started < 4.0, "a full batch must not wait for the delay"
    assert [len(call) for call in model.calls] == [4]
    assert [float(r[0, 0]) for r in results] == [0, 2, 4, 6]
    await batcher.close()


async def test_full_queue_is_refused_at_once(executor):
    model, batcher, running = await busy_batcher(executor, rows(0), max_batch_size=1, max_queue_size=2)
    behind = asyncio.ensure_future(batcher.submit(rows(1)))
    await asyncio.sleep(0)  # let it queue
    await wait_until(lambda: batcher.queue_depth == 0)  # a full batch: handed to the worker behind the first
    queued = [asyncio.ensure_future(batcher.submit(rows(i))) for i in (2, 3)]
    await wait_until(lambda: batcher.queue_depth == 2)
    with pytest.raises(Overloaded):
        await batcher.submit(rows(4))
    model.release.set()
    assert [float(r[0, 0]) for r in await asyncio.gather(running, behind, *queued)] == [0, 2, 4, 6]
    await batcher.close()


async def test_a_full_batch_queued_while_one_computes_runs_back_to_back_without_the_loop(executor):
    back_to_back = GatedModel()
    model, batcher, first = await busy_batcher(executor, rows(0, 1), max_batch_size=2, run_under_load=back_to_back)
    partial = asyncio.ensure_future(batcher.submit(rows(2)))
    await asyncio.sleep(0.01)
    assert batcher.queue_depth == 1  # not full: it waits, so that it may still grow
    rest = asyncio.ensure_future(batcher.submit(rows(3)))
    await wait_until(lambda: batcher.queue_depth == 0)  # now full: handed to the worker behind the first
    model.release.set()
    # Block the event loop: only a batch already handed to the worker can start now.
    assert back_to_back.entered.wait(timeout=5)
    assert [r[:, 0].tolist() for r in await asyncio.gather(first, partial, rest)] == [[0, 2], [4], [6]]
    assert [c[:, 0].tolist() for c in model.calls] == [[0, 1]]
    assert [c[:, 0].tolist() for c in back_to_back.calls] == [[2, 3]]
    await batcher.close()


async def test_a_batch_waiting_behind_another_on_the_worker_still_drops_requests_past_their_deadline(executor):
    model, batcher, running = await busy_batcher(executor, rows(0), max_batch_size=1)
    deadline = time.monotonic() + 0.5
    late = asyncio.ensure_future(batcher.submit(rows(1), deadline=deadline))
    await asyncio.sleep(0)  # let it queue
    assert batcher.queue_depth == 1
    await wait_until(lambda: batcher.queue_depth == 0)  # taken, in time, behind the running batch
    assert time.monotonic() < deadline
    await wait_until(lambda: time.monotonic() > deadline)
    model.release.set()
    assert float((await running)[0, 0]) == 0
    with pytest.raises(DeadlineExpired):
        await late
    assert [c[:, 0].tolist() for c in model.calls] == [[0]]
    await batcher.close()


async def test_a_batch_waiting_behind_another_on_the_worker_drops_requests_whose_callers_gave_up(executor):
    model, batcher, running = await busy_batcher(executor, rows(0), max_batch_size=1)
    abandoned = asyncio.ensure_future(batcher.submit(rows(1)))
    await asyncio.sleep(0)  # let it queue
    await wait_until(lambda: batcher.queue_depth == 0)  # taken behind the running batch
    abandoned.cancel()
    await asyncio.sleep(0)
    model.release.set()
    assert float((await running)[0, 0]) == 0
    assert abandoned.cancelled()
    kept = await batcher.submit(rows(2))  # the batcher carries on
    assert float(kept[0, 0]) == 4
    assert [c[:, 0].tolist() for c in model.calls] == [[0], [2]]
    await batcher.close()


async def test_expired_and_cancelled_requests_are_dropped_before_compute(executor):
    model, batcher, running = await busy_batcher(executor, rows(0), max_batch_size=8)
    expired = asyncio.ensure_future(batcher.submit(rows(100), deadline=time.monotonic() - 1))
    cancelled = asyncio.ensure_future(batcher.submit(rows(200)))
    kept = asyncio.ensure_future(batcher.submit(rows(300)))
    await wait_until(lambda: batcher.queue_depth == 3)
    cancelled.cancel()
    model.release.set()
    await running
    with pytest.raises(DeadlineExpired):
        await expired
    assert float((await kept)[0, 0]) == 600
    computed = np.concatenate(model.calls)[:, 0].tolist()
    assert 100 not in computed and 200 not in computed
    await batcher.close()


async def test_one_bad_request_does_not_fail_its_batch_mates(executor):
    model, batcher, running = await busy_batcher(executor, rows(0), max_batch_size=8)
    good = asyncio.ensure_future(batcher.submit(rows(1)))
    bad = asyncio.ensure_future(batcher.submit(rows(float("nan"))))
    also_good = asyncio.ensure_future(batcher.submit(rows(3)))
    await wait_until(lambda: batcher.queue_depth == 3)
    model.release.set()
    await running
    assert float((await good)[0, 0]) == 2
    assert float((await also_good)[0, 0]) == 6
    with pytest.raises(ValueError, match="NaN"):
        await bad
    await batcher.close()


async def test_close_answers_queued_requests_and_refuses_new_ones(executor):
    model = GatedModel(hold=True)
    batcher = DynamicBatcher(model, executor, max_batch_size=1)
    batcher.start()
    accepted = [asyncio.ensure_future(batcher.submit(rows(i))) for i in range(3)]
    await wait_until(model.entered.is_set)
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0)
    with pytest.raises(ModelNotReady):
        await batcher.submit(rows(9))
    model.release.set()
    await closing
    assert [float(r[0, 0]) for r in await asyncio.gather(*accepted)] == [0, 2, 4]


async def test_model_returning_wrong_row_count_fails_every_caller(executor):
    batcher = DynamicBatcher(lambda batch: batch[:1], executor, max_batch_size=8)
    batcher.start()
    with pytest.raises(RuntimeError, match="returned 1 rows for 3"):
        await batcher.submit(rows(1, 2, 3))
    await batcher.close()


def test_rejects_bad_settings(executor):
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1"):
        DynamicBatcher(lambda b: b, executor, max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue_size"):
        DynamicBatcher(lambda b: b, executor, max_batch_size=1, max_queue_size=0)
    with pytest.raises(ValueError, match="inline_budget_s"):
        DynamicBatcher(lambda b: b, executor, max_batch_size=1, inline_budget_s=-1)
    with pytest.raises(ValueError, match="instances must be an integer >= 1"):
        DynamicBatcher(lambda b: b, executor, max_batch_size=1, instances=0)


class ConcurrentModel:
    """Doubles its input; counts the calls computing at once, each held until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.inside = 0
        self.most_inside = 0
        self.calls: list[list[float]] = []
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.calls.append(batch[:, 0].tolist())
        self.release.wait(timeout=10)
        with self._lock:
            self.inside -= 1
        return batch * 2


@pytest.mark.parametrize("instances", [1, 2])
async def test_full_batches_compute_at_once_on_each_instance_and_one_more_waits_behind_them(instances):
    model = ConcurrentModel()
    with ThreadPoolExecutor(max_workers=instances) as pool:
        batcher = DynamicBatcher(model, pool, max_batch_size=2, instances=instances)
        batcher.start()
        requests = [asyncio.ensure_future(batcher.submit(rows(2 * i, 2 * i + 1))) for i in range(instances + 2)]
        await wait_until(lambda: model.inside == instances)
        # One full batch more is taken to wait on the worker; the last stays queued, free to be dropped.
        await wait_until(lambda: batcher.queue_depth == 1)
        await asyncio.sleep(0.05)
        assert model.inside == instances and batcher.queue_depth == 1
        model.release.set()
        results = await asyncio.gather(*requests)
        await batcher.close()
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, rows(4 * i, 4 * i + 2))
    assert model.most_inside == instances
    assert sorted(model.calls) == [[2 * i, 2 * i + 1] for i in range(instances + 2)]


async def test_batches_expected_to_be_quick_run_on_the_loop_thread_and_slow_ones_on_the_worker(executor):
    threads: list[str] = []

    def model(batch: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread().name)
        time.sleep(0.002 * len(batch))  # 2 ms per row
        return batch * 2

    batcher = DynamicBatcher(model, executor, max_batch_size=8, inline_budget_s=0.005)
    batcher.start()
    for batch in (rows(1), rows(1), rows(1, 2), rows(1, 2, 3)):
        np.testing.assert_array_equal(await batcher.submit(batch), batch * 2)
    loop_thread = threading.current_thread().name
    # The first call has no measured speed yet, so it goes to the worker; then 2 rows fit 5 ms, 3 do not.
    assert threads[0] != loop_thread
    assert threads[1] == loop_thread and threads[2] == loop_thread
    assert threads[3] != loop_thread
    await batcher.close()


async def test_lone_quick_request_runs_in_its_callers_task_and_queues_while_a_batch_computes(executor):
    tasks: list[asyncio.Task | None] = []
    release = threading.Event()

    def model(batch: np.ndarray) -> np.ndarray:
        tasks.append(asyncio.current_task() if threading.current_thread() is threading.main_thread() else None)
        if len(batch) > 2:
            release.wait(timeout=10)  # the big batch runs on the worker and holds the model
        return batch * 2

    observed: list[tuple[int, list[float]]] = []

    class Observer:
        def observe_batch(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
            observed.append((rows, queue_seconds))

        def observe_queue_depth(self, requests: int) -> None:
            pass

    batcher = DynamicBatcher(model, executor, max_batch_size=8, inline_budget_s=0.5, observer=Observer())
    batcher.start()
    await batcher.submit(rows(1))  # no measured speed yet: through the batching task
    assert tasks[-1] is not asyncio.current_task()
    np.testing.assert_array_equal(await batcher.submit(rows(3)), rows(6))
    assert tasks[-1] is asyncio.current_task()  # now known to be quick: run by its caller
    assert observed[-1] == (1, [0.0])

    batcher._seconds_per_row = 1.0  # the next 3-row batch is predicted slow: it goes to the worker
    big = asyncio.ensure_future(batcher.submit(rows(1, 2, 3)))
    await wait_until(lambda: len(tasks) == 3)
    batcher._seconds_per_row = 1e-6
    small = [asyncio.ensure_future(batcher.submit(rows(v))) for v in (4, 5)]
    await asyncio.sleep(0.01)
    assert len(tasks) == 3 and batcher.queue_depth == 2  # the model is busy, so they wait their turn
    release.set()
    np.testing.assert_array_equal(await big, rows(2, 4, 6))
    assert [r.tolist() for r in await asyncio.gather(*small)] == [rows(8).tolist(), rows(10).tolist()]
    assert len(tasks) == 4  # and were batched together
    await batcher.close()


async def test_direct_run_respects_an_expired_deadline_and_queue_delay(executor):
    calls: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return batch

    batcher = DynamicBatcher(model, executor, max_batch_size=8, inline_budget_s=0.5)
    batcher.start()
    await batcher.submit(rows(1))
    with pytest.raises(DeadlineExpired):
        await batcher.submit(rows(1), deadline=time.monotonic() - 1)
    assert calls == [1]
    await batcher.close()

    delayed = DynamicBatcher(model, executor, max_batch_size=8, max_queue_delay_s=0.05, inline_budget_s=0.5)
    delayed.start()
    await delayed.submit(rows(1))
    results = await asyncio.gather(*(delayed.submit(rows(v)) for v in (1, 2, 3)))
    assert len(results) == 3 and calls[-1] == 3  # with a queue delay set, requests still wait to batch
    await delayed.close()


def test_load_aware_hold_is_tried_only_on_quick_arrivals_kept_while_it_pays_and_backs_off_when_not():
    hold = LoadAwareHold(0.001)
    assert not hold.on_arrival(10.0)  # first request ever
    assert not hold.on_arrival(10.5)  # a lone caller: the previous request came long ago
    assert hold.on_arrival(10.5002) and hold.holding  # a quick arrival: try a hold
    hold.judge(gathered=6, arrived_meanwhile=True)
    assert hold.holding and hold.on_arrival(10.5004)  # it paid: keep holding
    hold.judge(gathered=8, arrived_meanwhile=False)  # every caller was in the batch: lockstep
    assert not hold.holding
    assert not hold.on_arrival(10.5006)  # skips one chance ...
    assert hold.on_arrival(10.5008)  # ... then tries again
    hold.judge(gathered=1, arrived_meanwhile=False)
    skipped = 0
    while not hold.on_arrival(10.501 + skipped * 1e-4):
        skipped += 1
    assert skipped == 2  # then two, four, ... chances
    hold.judge(gathered=2, arrived_meanwhile=True)  # too few to pay
    for _ in range(20):
        hold.judge(gathered=1, arrived_meanwhile=False)
    skipped = 0
    while not hold.on_arrival(10.502 + skipped * 1e-4):
        skipped += 1
    assert skipped == LoadAwareHold.MAX_SKIP
    with pytest.raises(ValueError):
        LoadAwareHold(-1)


async def test_hold_batches_a_stream_of_requests_on_the_worker_but_a_lone_caller_never_waits(executor):
    calls: list[tuple[int, bool]] = []
    under_load: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        calls.append((len(batch), threading.current_thread() is threading.main_thread()))
        time.sleep(0.003)  # long enough for more requests to arrive while it computes
        return batch * 2

    def model_under_load(batch: np.ndarray) -> np.ndarray:
        under_load.append(len(batch))
        return model(batch)

    batcher = DynamicBatcher(model, executor, max_batch_size=64, inline_budget_s=0.5, hold_under_load_s=0.02,
                             run_under_load=model_under_load)
    batcher.start()
    started = time.monotonic()
    for value in range(5):  # one caller, a request every 30 ms: never held
        await asyncio.sleep(0.03)
        np.testing.assert_array_equal(await batcher.submit(rows(value)), rows(2 * value))
    assert [size for size, _ in calls] == [1] * 5 and all(on_loop for _, on_loop in calls[1:])
    assert under_load == []
    assert time.monotonic() - started < 0.15 + 0.1

    async def one(value: int) -> None:
        np.testing.assert_array_equal(await batcher.submit(rows(value)), rows(2 * value))

    calls.clear()
    requests = []
    for value in range(120):  # many independent callers: a request about every millisecond
        requests.append(asyncio.ensure_future(one(value)))
        await asyncio.sleep(0.0005)
    await asyncio.gather(*requests)
    held = [size for size, on_loop in calls if not on_loop]
    assert sum(size for size, _ in calls) == 120
    assert sum(held) >= 90 and max(held) >= LoadAwareHold.PAYS_AT  # the hold paid, so it stayed on
    assert under_load == held  # held batches are run as under load
    await batcher.close()
