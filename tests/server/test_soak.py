"""The soak: minutes of good and bad requests mixed against one server process (``make soak``; skipped by ``make test``)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from convserve_bench.processes import ServerProcess
from convserve_protocol.protos import classifier_pb2 as cpb
from convserve_protocol.protos import classifier_pb2_grpc as cpb_grpc
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.callers import SHAPE, GoodCallers, infer_request
from tests.models import write_version

SOAK_SECONDS = float(os.environ.get("CONVSERVE_SOAK_SECONDS", "240"))
SETTLE_SECONDS = 20.0


def bad_requests() -> list[tuple[str, object]]:
    """One of each kind of bad request, with the method it goes to."""
    nan = np.zeros((2, *SHAPE), np.float32)
    nan[1, 0, 0, 0] = np.nan
    wrong_bytes = infer_request(np.zeros((2, *SHAPE), np.float32))
    wrong_bytes.inputs[0].shape[0] = 3
    billions = infer_request(np.zeros((1, *SHAPE), np.float32))
    billions.inputs[0].shape[0] = 10**12
    unknown = infer_request(np.zeros((1, *SHAPE), np.float32))
    unknown.model_name = "nope"
    return [
        ("classify", cpb.ClassifyRequest(images=nan.astype("<f4").tobytes(), shape=list(nan.shape))),
        ("infer", wrong_bytes), ("infer", billions), ("infer", unknown),
        ("classify", cpb.ClassifyRequest(images=b"", shape=[0, *SHAPE])),
        ("classify", cpb.ClassifyRequest(images=np.ones((1, *SHAPE), "<f4").tobytes(), shape=[1, *SHAPE], top_k=99)),
        ("garbage", b"\xff\xfe not protobuf"),
    ]


class BadCaller(threading.Thread):
    """Sends the bad requests round and round; records any answer that is not a clear error."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.stop = threading.Event()
        self.sent = 0
        self.wrong: list[str] = []

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            calls = {"infer": pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer,
                     "classify": cpb_grpc.ClassifierStub(channel).Classify,
                     "garbage": channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")}
            cases = bad_requests()
            while not self.stop.is_set():
                method, request = cases[self.sent % len(cases)]
                try:
                    calls[method](request, timeout=10)
                    self.wrong.append(f"{method} answered OK")
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                        self.wrong.append(f"{method}: {exc.code()} {exc.details()}")
                self.sent += 1


@pytest.mark.soak
@pytest.mark.timeout(SETTLE_SECONDS + SOAK_SECONDS + 180)
def test_soak_good_and_bad_requests_for_minutes(tmp_path: Path):
    model_path = write_version(tmp_path / "models", "tiny", 1)
    with ServerProcess(tmp_path / "models") as server:
        bad = BadCaller(server.address)
        with GoodCallers(server.address, model_path, threads=3) as good:
            bad.start()
            time.sleep(SETTLE_SECONDS)
            rss_start = server.rss_mb()
            answered_start = good.answered
            time.sleep(SOAK_SECONDS)
            rss_end = server.rss_mb()
            bad.stop.set()
            bad.join(timeout=30)
        growth = (rss_end - rss_start) / rss_start
        print(f"soak {SOAK_SECONDS:.0f} s: {good.answered - answered_start} good requests, {bad.sent} bad; "
              f"RSS {rss_start:.1f} -> {rss_end:.1f} MB ({100 * growth:+.2f}%)")
        assert good.failures == []
        assert good.answered - answered_start > SOAK_SECONDS * 10
        assert bad.wrong == [] and bad.sent > 0
        assert growth < 0.05
        assert server.alive
