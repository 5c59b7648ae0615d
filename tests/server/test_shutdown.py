"""SIGTERM under real load: every call ends answered, or refused UNAVAILABLE before it did any work; never CANCELLED.

Sixteen closed-loop callers send single-image ModelInfer calls to a real ``python -m convserve_server`` and
keep going through the shutdown until the process has exited.  Every outcome is recorded.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import threading
import time
from pathlib import Path
from typing import Self

import grpc
import grpc.aio
import numpy as np
import pytest
from convserve_bench.processes import ServerProcess
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc

from tests.models import TINY_LABELS

CALLERS = 16
RUNS = 5
GRACE_S = 5.0
ANSWERS_BEFORE_SIGTERM = 100  # real load first: on this machine about 0.3 s of it
ALLOWED = {"OK", "UNAVAILABLE"}


def single_image_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8, 3])
    request.raw_input_contents.append(np.random.default_rng(0).random((1, 8, 8, 3), dtype=np.float32).tobytes())
    return request


class ClosedLoopCallers:
    """``CALLERS`` threads, each sending its next call as soon as the last one ended, until the server exited."""

    def __init__(self, server: ServerProcess, shared_channel: bool) -> None:
        self._server = server
        count = 1 if shared_channel else CALLERS
        self._channels = [grpc.insecure_channel(server.address) for _ in range(count)]
        self._lock = threading.Lock()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}
        self.answered_by = [0] * CALLERS
        self.wrong_answers = 0
        self.answered_at_sigterm = 0
        self._threads = [threading.Thread(target=self._call, args=(index,), daemon=True) for index in range(CALLERS)]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for thread in self._threads:
            thread.join(timeout=30)
        for channel in self._channels:
            channel.close()

    @property
    def answered(self) -> int:
        with self._lock:
            return self.outcomes["OK"]

    def _call(self, index: int) -> None:
        infer = pb_grpc.GRPCInferenceServiceStub(self._channels[index % len(self._channels)]).ModelInfer
        request = single_image_request()
        give_up_at = time.monotonic() + 60
        while time.monotonic() < give_up_at:
            try:
                response = infer(request, timeout=10)
                code, details = "OK", ""
                right = list(response.outputs[0].shape) == [1, len(TINY_LABELS)]
            except grpc.RpcError as exc:
                code, details, right = exc.code().name, exc.details() or "", True
            with self._lock:
                self.outcomes[code] += 1
                self.examples.setdefault(code, details)
                self.wrong_answers += not right
                self.answered_by[index] += code == "OK"
            if code != "OK" and self._server.process.poll() is not None:
                return  # the server has exited: nothing more to learn


def sigterm_under_load(repository: Path, shared_channel: bool, *flags: str) -> tuple[ClosedLoopCallers, int, float]:
    """One run: callers up to speed, SIGTERM, wait for the exit; the callers, the exit status and seconds to exit."""
    server = ServerProcess(repository, "--grace-period-s", str(GRACE_S), *flags)
    with server, ClosedLoopCallers(server, shared_channel) as callers:
        deadline = time.monotonic() + 30
        while callers.answered < ANSWERS_BEFORE_SIGTERM or min(callers.answered_by) == 0:
            assert time.monotonic() < deadline, f"callers never got going: {dict(callers.outcomes)}"
            time.sleep(0.01)
        callers.answered_at_sigterm = callers.answered
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        status = server.process.wait(timeout=30)
        seconds = time.monotonic() - signalled
    return callers, status, seconds


@pytest.mark.parametrize("shared_channel", [False, True], ids=["a-channel-each", "one-shared-channel"])
def test_sigterm_under_16_closed_loop_callers_cancels_nothing(tiny_repo, shared_channel):
    for run in range(RUNS):
        callers, status, seconds = sigterm_under_load(tiny_repo, shared_channel)
        outcomes = dict(callers.outcomes)
        assert set(outcomes) <= ALLOWED, f"run {run}: {outcomes}, e.g. {callers.examples}"
        assert callers.wrong_answers == 0
        assert outcomes["OK"] >= ANSWERS_BEFORE_SIGTERM and outcomes["UNAVAILABLE"] >= CALLERS, outcomes
        assert status == 0 and seconds < GRACE_S, f"run {run}: exit status {status} after {seconds:.1f} s"


def test_sigterm_with_a_drain_delay_answers_through_the_delay_and_cancels_nothing(tiny_repo):
    delay_s = 0.5
    for run in range(2):
        callers, status, seconds = sigterm_under_load(tiny_repo, run == 1, "--drain-delay-s", str(delay_s))
        outcomes = dict(callers.outcomes)
        assert set(outcomes) <= ALLOWED, f"run {run}: {outcomes}, e.g. {callers.examples}"
        assert callers.answered > callers.answered_at_sigterm + CALLERS, "calls must be answered during the delay"
        assert status == 0 and delay_s <= seconds < delay_s + GRACE_S, f"exit status {status} after {seconds:.1f} s"


async def test_a_call_arriving_during_the_drain_does_no_work_and_is_refused_unavailable(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_queue_delay_us=500_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        accepted = asyncio.ensure_future(infer(single_image_request(), timeout=10))  # waits out the queue delay
        while server.core.loaded("tiny")[0].batcher.queue_depth < 1:
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(server.shutdown(grace_s=5))
        while not server.core.draining:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(single_image_request(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in caught.value.details()
        assert list((await accepted).outputs[0].shape) == [1, len(TINY_LABELS)]
        await asyncio.wait_for(stopping, 10)
    statistics = server.core.loaded("tiny")[0].statistics
    assert statistics.inference_count == 1, "only the accepted call was computed"
