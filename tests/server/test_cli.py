"""``convserve-serve`` as a process: startup errors (one without a GPU), SIGTERM with requests in flight, its log."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from convserve_bench.processes import (
    ServerProcess, free_port, metric_samples, wait_until_ready, wait_until_serving_metrics,
)
from convserve_protocol.protos import classifier_pb2 as cpb
from convserve_protocol.protos import classifier_pb2_grpc as cpb_grpc
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server.runtime import CUDA

from tests.gpu import cuda_unusable
from tests.images import encode, tiff_with_samples_per_pixel
from tests.models import tiny_model, write_version


def serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "convserve_server", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CONVSERVE_METRICS_PORT": "-1"},
    )


def one_line_error(process: subprocess.Popen[str]) -> str:
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("convserve-serve: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_repository_is_a_one_line_error(tmp_path):
    assert "no <name>/<version>/model.onnx" in one_line_error(serve("--model-repository", str(tmp_path / "none")))


def test_corrupt_model_is_a_one_line_error(tmp_path):
    path = tmp_path / "m" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x08\x07garbage that is not a protobuf")
    assert "not a loadable ONNX model" in one_line_error(serve("--model-repository", str(tmp_path)))


def test_model_without_card_is_refused(tmp_path):
    model = tiny_model()
    del model.metadata_props[:]
    write_version(tmp_path, "bare", 1, model)
    assert "model metadata lacks" in one_line_error(serve("--model-repository", str(tmp_path)))


def test_bad_flag_values_are_one_line_errors(tmp_path):
    assert "device" in one_line_error(serve("--device", "tpu"))
    assert "max_batch_size" in one_line_error(serve("--max-batch-size", "0"))
    assert "model_instances" in one_line_error(serve("--model-instances", "0"))
    assert "max_queue_delay_us" in one_line_error(serve("--max-queue-delay-us", "-1"))
    assert "3 workers need metrics ports 65534..65536" in one_line_error(serve("--workers", "3", "--metrics-port", "65534"))


def test_busy_ports_are_one_line_errors(tiny_repo):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        common = ("--model-repository", str(tiny_repo), "--device", "cpu", "--host", "127.0.0.1",
                  "--metrics-host", "127.0.0.1")
        assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(serve(*common, "--port", port))
        error = one_line_error(serve(*common, "--port", "0", "--metrics-port", port))
        assert f"cannot serve metrics on 127.0.0.1:{port}" in error and "in use" in error


def test_workers_share_the_grpc_port_and_each_serves_its_own_metrics(tiny_repo):
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8, 3])
    request.raw_input_contents.append(np.zeros((1, 8, 8, 3), "<f4").tobytes())
    with ServerProcess(tiny_repo, "--workers", "2") as server:
        # Ready means one worker answered; the other may still be starting, and its metrics with it.
        wait_until_serving_metrics("127.0.0.1", [server.metrics_port, server.metrics_port + 1])
        for _ in range(8):  # one connection each: the kernel spreads connections, not requests
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(5):
                    assert len(stub.ModelInfer(request, timeout=10).outputs) == 1
        answered = 'convserve_requests_total{code="OK",method="ModelInfer",model="tiny"}'
        per_worker = [server.metric(answered, worker) for worker in range(2)]
    assert sum(per_worker) == 40, per_worker  # every request counted once, by the worker that answered it


def test_a_worker_that_cannot_start_stops_the_others_and_the_command_fails(tiny_repo):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        second_workers_port = taken.getsockname()[1]
        process = serve("--model-repository", str(tiny_repo), "--device", "cpu", "--host", "127.0.0.1",
                        "--port", "0", "--workers", "2", "--metrics-port", str(second_workers_port - 1))
        error = one_line_error(process)  # it exits: the worker that started is stopped too
    assert any(f"cannot serve metrics on 0.0.0.0:{port}" in error for port in (second_workers_port - 1, second_workers_port))


HAS_CUDA = cuda_unusable() is None


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a working CUDA provider; the no-fallback error cannot happen")
def test_device_cuda_without_cuda_is_a_one_line_startup_error_not_a_cpu_fallback(tiny_repo):
    process = serve("--model-repository", str(tiny_repo), "--device", "cuda", "--log-level", "WARNING")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    # Nothing else: not ORT's own log lines, nor what onnxruntime.preload_dlls prints about missing libraries.
    assert out == "" and len(err.strip().splitlines()) == 1, err
    line = err.strip()
    assert line.startswith("convserve-serve: error: --device cuda"), err
    if CUDA in ort.get_available_providers():  # onnxruntime-gpu without a usable GPU: why, naming a missing library
        assert "not falling back to the CPU" in line and (
            "cannot open shared object file" in line or "no usable GPU" in line), line
    else:
        assert "no CUDA execution provider" in line, line


def test_the_heap_built_at_startup_is_exempt_from_garbage_collection(tiny_repo):
    port = free_port()
    process = serve("--model-repository", str(tiny_repo), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu")
    try:
        wait_until_ready(f"127.0.0.1:{port}", process)
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    frozen = [line for line in err.splitlines() if "exempt from garbage collection" in line]
    assert len(frozen) == 1, err
    # Imported modules, the model and the gRPC stack: tens of thousands of objects a full collection skips.
    assert int(frozen[0].split(": ")[-1].split()[0]) > 10_000, frozen[0]


def test_sigterm_with_requests_in_flight_answers_them_and_exits_zero(tiny_repo):
    port = free_port()
    metrics_port = free_port()
    process = serve("--model-repository", str(tiny_repo), "--host", "127.0.0.1", "--port", str(port),
                    "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
                    "--device", "cpu", "--max-queue-delay-us", "500000", "--grace-period-s", "10")
    try:
        wait_until_ready(f"127.0.0.1:{port}", process)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="tiny")
        request.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8, 3])
        request.raw_input_contents.append(np.zeros((1, 8, 8, 3), "<f4").tobytes())
        in_flight = [stub.ModelInfer.future(request, timeout=20) for _ in range(6)]
        deadline = time.monotonic() + 10
        while dict(metric_samples("127.0.0.1", metrics_port)).get('convserve_queue_depth{model="tiny"}', 0) < 6:
            assert time.monotonic() < deadline, "the six requests never all queued"  # behind the 0.5 s queue delay
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        assert all(len(call.result().outputs) == 1 for call in in_flight)
        assert process.wait(timeout=20) == 0
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()
        _, err = process.communicate()
    assert "event loop: uvloop" in err  # installed here, so used


def test_malformed_images_from_callers_leave_no_errors_or_warnings_in_the_servers_log(tiny_repo):
    port = free_port()
    process = serve("--model-repository", str(tiny_repo), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu")
    try:
        wait_until_ready(f"127.0.0.1:{port}", process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            classify = cpb_grpc.ClassifierStub(channel).Classify
            malformed = cpb.ClassifyRequest(model_name="tiny", encoded_images=[tiff_with_samples_per_pixel(40000)])
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as refused:
                    classify(malformed, timeout=20)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "encoded_images[0]" in refused.value.details()
            good = encode(np.full((8, 8, 3), 200, np.uint8), "PNG")
            assert len(classify(cpb.ClassifyRequest(model_name="tiny", encoded_images=[good]), timeout=20).results) == 1
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert "ready: serving tiny" in err  # the log was read, and is the server's
    assert "PIL" not in err and " ERROR " not in err and "Warning" not in err, err
