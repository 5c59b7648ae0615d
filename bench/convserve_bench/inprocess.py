"""ONNX Runtime timed in this process, single-threaded: the model's own cost, with no server around it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WARMUP_RUNS = 5
MIN_RUNS = 5


@dataclass(frozen=True)
class InProcessTiming:
    """Seconds per ``session.run`` of one batch size."""

    batch: int
    runs: int
    mean_s: float
    median_s: float


class SingleThreadedModel:
    """An ONNX Runtime CPU session with one intra-op and one inter-op thread, and random input of any batch size."""

    def __init__(self, model_path: Path, input_name: str, image_shape: tuple[int, int, int]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self._input_name = input_name
        self._image_shape = image_shape
        self._warmed: set[int] = set()

    def time(self, batch: int, seconds: float) -> InProcessTiming:
        """Run ``batch`` images again and again for at least ``seconds`` (and :data:`MIN_RUNS` runs)."""
        images = {self._input_name: np.random.default_rng(0).random((batch, *self._image_shape), dtype=np.float32)}
        if batch not in self._warmed:
            for _ in range(WARMUP_RUNS):
                self._session.run(None, images)
            self._warmed.add(batch)
        durations: list[float] = []
        started = time.perf_counter()
        while len(durations) < MIN_RUNS or time.perf_counter() - started < seconds:
            before = time.perf_counter()
            self._session.run(None, images)
            durations.append(time.perf_counter() - before)
        return InProcessTiming(batch, len(durations), float(np.mean(durations)), float(np.median(durations)))
