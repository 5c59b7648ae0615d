"""The ONNX Runtime wrapper on its own: a real model file, no server."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from convserve_server.runtime import DeviceRequest, OnnxModel, _usable_cores


def test_small_batches_use_a_single_threaded_session_with_the_same_results(tiny_repo):
    path = tiny_repo / "tiny/1/model.onnx"
    model = OnnxModel.load(path, DeviceRequest("cpu"), intra_op_threads=2, small_batch_rows=4)
    assert model._small_batch_session is not model._session
    assert model._small_batch_session.get_session_options().intra_op_num_threads == 1
    batch = np.random.default_rng(1).random((8, *model.input_shape), dtype=np.float32)
    together = model.run(batch)  # 8 rows: the multi-threaded session
    apart = np.concatenate([model.run(batch[i : i + 2]) for i in range(0, 8, 2)])  # 2 rows: the small one
    np.testing.assert_allclose(apart, together, atol=1e-6)


def test_no_second_session_when_one_thread_is_asked_for_anyway(tiny_repo):
    model = OnnxModel.load(tiny_repo / "tiny/1/model.onnx", DeviceRequest("cpu"), intra_op_threads=1, small_batch_rows=4)
    assert model._small_batch_session is model._session


def test_batches_run_under_load_leave_one_core_to_the_loop_with_the_same_results(tiny_repo):
    path = tiny_repo / "tiny/1/model.onnx"
    model = OnnxModel.load(path, DeviceRequest("cpu"), intra_op_threads=3, small_batch_rows=4)
    threads = {name: getattr(model, name).get_session_options().intra_op_num_threads
               for name in ("_session", "_under_load_session", "_small_batch_session")}
    assert threads == {"_session": 3, "_under_load_session": 2, "_small_batch_session": 1}
    batch = np.random.default_rng(2).random((8, *model.input_shape), dtype=np.float32)
    np.testing.assert_allclose(model.run_under_load(batch), model.run(batch), atol=1e-6)


def test_instances_share_out_the_threads_of_batches_run_under_load_and_may_run_at_once(tiny_repo):
    model = OnnxModel.load(tiny_repo / "tiny/1/model.onnx", DeviceRequest("cpu"), intra_op_threads=5,
                           small_batch_rows=0, instances=2)
    assert model._under_load_session.get_session_options().intra_op_num_threads == 2  # (5 - 1) // 2
    batches = [np.random.default_rng(seed).random((16, *model.input_shape), dtype=np.float32) for seed in range(8)]
    alone = [model.run_under_load(batch) for batch in batches]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(5):
            together = list(pool.map(model.run_under_load, batches))
            for expected, got in zip(alone, together):
                np.testing.assert_allclose(got, expected, atol=1e-6)


def test_on_two_threads_batches_run_under_load_share_the_single_threaded_session(tiny_repo):
    model = OnnxModel.load(tiny_repo / "tiny/1/model.onnx", DeviceRequest("cpu"), intra_op_threads=2, small_batch_rows=4)
    assert model._under_load_session is model._small_batch_session


def test_by_default_batches_under_load_get_one_thread_fewer_than_the_physical_cores(tiny_repo):
    cores = _usable_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    model = OnnxModel.load(tiny_repo / "tiny/1/model.onnx", DeviceRequest("cpu"), small_batch_rows=0)
    assert model._under_load_session.get_session_options().intra_op_num_threads == max(1, cores - 1)
