"""The ONNX Runtime wrapper on its own: a real model file, no server."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from convserve_server.runtime import DeviceRequest, OnnxModel, default_intra_op_threads


def test_one_instance_keeps_onnx_runtimes_default_and_several_share_out_the_cores():
    cpus = len(os.sched_getaffinity(0))
    assert default_intra_op_threads(1) == 0
    assert 1 <= default_intra_op_threads(2) <= max(1, cpus // 2)
    assert default_intra_op_threads(2) >= default_intra_op_threads(3) >= default_intra_op_threads(64) == 1


def test_the_model_gets_its_share_of_threads_unless_the_operator_sets_them(tiny_repo):
    path = tiny_repo / "tiny/1/model.onnx"
    assert OnnxModel.load(path, DeviceRequest("cpu"), instances=64).intra_op_threads == 1
    assert OnnxModel.load(path, DeviceRequest("cpu"), instances=2).intra_op_threads == default_intra_op_threads(2)
    assert OnnxModel.load(path, DeviceRequest("cpu"), intra_op_threads=3, instances=64).intra_op_threads == 3


def test_instances_may_run_the_model_at_once_with_the_results_of_runs_alone(tiny_repo):
    model = OnnxModel.load(tiny_repo / "tiny/1/model.onnx", DeviceRequest("cpu"), instances=2)
    batches = [np.random.default_rng(seed).random((16, *model.input_shape), dtype=np.float32) for seed in range(8)]
    alone = [model.run(batch) for batch in batches]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(5):
            together = list(pool.map(model.run, batches))
            for expected, got in zip(alone, together):
                np.testing.assert_allclose(got, expected, atol=1e-6)
