"""Callers for long-running tests: threads that keep sending valid requests and check every answer."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from convserve_bench.rpc import classify_request
from convserve_bench.rpc import infer_request as _infer_request
from convserve_protocol.protos import classifier_pb2_grpc as cpb_grpc
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc

SHAPE = (8, 8, 3)


class GoodCallers:
    """Threads that keep sending valid requests on both services and check every answer."""

    def __init__(self, address: str, model_path: Path, threads: int = 2) -> None:
        self._address = address
        self._session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._call, args=(seed,), daemon=True) for seed in range(threads)]
        self.answered = 0
        self.failures: list[str] = []

    def __enter__(self) -> GoodCallers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _call(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(self._address) as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            classify = cpb_grpc.ClassifierStub(channel).Classify
            while not self._stop.is_set():
                batch = rng.random((int(rng.integers(1, 5)), *SHAPE), dtype=np.float32)
                expected = self._session.run(None, {"image": batch})[0]
                try:
                    response = infer(infer_request(batch), timeout=10)
                    got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(expected.shape)
                    np.testing.assert_allclose(got, expected, atol=1e-5)
                    labels = classify(classify_request(batch, ""), timeout=10)
                    assert [r.top_k[0].class_index for r in labels.results] == expected.argmax(axis=1).tolist()
                except (grpc.RpcError, AssertionError) as exc:
                    with self._lock:
                        self.failures.append(repr(exc)[:300])
                else:
                    with self._lock:
                        self.answered += 1


def infer_request(batch: np.ndarray) -> pb.ModelInferRequest:
    """A ModelInfer request for the tiny test model (tests.models)."""
    return _infer_request(batch, "tiny", "image")
