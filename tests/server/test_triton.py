"""Triton's extensions: tritonclient's config, statistics and repository calls, and perf_analyzer, unchanged."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.models import TINY_LABELS, write_version
from tests.server.test_server import infer_request, metric, reference

# tritonclient registers its own copy of the "inference" protos, which would clash with ours in one process:
# each script runs in a process of its own, exactly as a user's program would, and prints what it saw as JSON.
PRELUDE = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException
client = triton.InferenceServerClient(sys.argv[1])

def infer(model, batch):
    tensor = triton.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return client.infer(model, [tensor]).as_numpy("probabilities")

def status_of(call):
    try:
        call()
    except InferenceServerException as exc:
        return f"{exc.status()}: {exc.message()}"
    return "OK"
"""

CONFIG_SCRIPT = PRELUDE + """
print(json.dumps(client.get_model_config("tiny", as_json=True)["config"]))
"""

STATISTICS_SCRIPT = PRELUDE + """
for rows in json.loads(sys.argv[2]):
    infer("tiny", np.full((rows, 8, 8, 3), 0.5, np.float32))
impossible = np.full((int(sys.argv[3]), 8, 8, 3), 0.5, np.float32)  # more chunks than the queue ever holds
failure = status_of(lambda: infer("tiny", impossible))
print(json.dumps({"failure": failure, "statistics": client.get_inference_statistics("tiny", as_json=True),
                  "every_model": client.get_inference_statistics(as_json=True)}))
"""

REPOSITORY_SCRIPT = PRELUDE + """
image = np.full((1, 8, 8, 3), 0.5, np.float32)
seen = {"index_before": client.get_model_repository_index(as_json=True)["models"]}
seen["load_absent"] = status_of(lambda: client.load_model("absent"))
seen["other_before_load"] = status_of(lambda: infer("other", image))
client.load_model("other")
seen["other_ready"] = client.is_model_ready("other")
seen["other_probabilities"] = infer("other", image).tolist()
seen["absent_ready"] = client.is_model_ready("absent")
client.unload_model("tiny")
seen["tiny_after_unload"] = status_of(lambda: infer("tiny", image))
seen["tiny_ready_after_unload"] = client.is_model_ready("tiny")
seen["index_after_unload"] = client.get_model_repository_index(as_json=True)["models"]
client.load_model("tiny")
seen["tiny_after_reload"] = infer("tiny", image).tolist()
print(json.dumps(seen))
"""

STREAM_SCRIPT = PRELUDE + """
import queue
answers = queue.Queue()
client.start_stream(callback=lambda result, error: answers.put((result, error)))
batches = {str(i): np.random.default_rng(i).random((1 + i % 3, 8, 8, 3), dtype=np.float32) for i in range(20)}
for key, batch in batches.items():
    tensor = triton.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    client.async_stream_infer("tiny", [tensor], request_id=key)
wrong = triton.InferInput("image", [1, 5, 5, 3], "FP32")
wrong.set_data_from_numpy(np.zeros((1, 5, 5, 3), np.float32))
client.async_stream_infer("tiny", [wrong], request_id="wrong")
seen = {"results": {}, "errors": []}
for _ in range(len(batches) + 1):
    result, error = answers.get(timeout=30)
    if error is not None:
        seen["errors"].append(str(error))
    else:
        seen["results"][result.get_response().id] = result.as_numpy("probabilities").tolist()
client.stop_stream()
seen["unary"] = {key: infer("tiny", batch).tolist() for key, batch in batches.items()}
print(json.dumps(seen))
"""

CLASSIFICATION_SCRIPT = PRELUDE + """
batch = np.random.default_rng(7).random((3, 8, 8, 3), dtype=np.float32)
tensor = triton.InferInput("image", list(batch.shape), "FP32")
tensor.set_data_from_numpy(batch)
result = client.infer("tiny", [tensor], outputs=[triton.InferRequestedOutput("probabilities", class_count=2)])
classes = result.as_numpy("probabilities")
print(json.dumps({"shape": list(classes.shape), "classes": [[c.decode() for c in row] for row in classes],
                  "probabilities": infer("tiny", batch).tolist()}))
"""


async def run_tritonclient(script: str, *args: str) -> Any:
    """Run a tritonclient script in its own process; what it printed, parsed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    return json.loads(stdout)


def address(server) -> str:
    return f"127.0.0.1:{server.port}"


def stage_model(tmp_path: Path, repository: Path, name: str, version: int, **kwargs: object) -> None:
    """Put a model version into ``repository`` at once (written beside it, then renamed): no poll sees half a file."""
    write_version(tmp_path / "staging", name, version, **kwargs)
    (repository / name).mkdir(exist_ok=True)
    os.rename(tmp_path / "staging" / name / str(version), repository / name / str(version))


async def test_model_config_reports_the_real_batching_and_instances(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_batch_size=16, max_queue_delay_us=300, max_queue_size=77,
                                model_instances=3, versions_per_model=2)
    config = await run_tritonclient(CONFIG_SCRIPT, address(server))
    assert config["name"] == "tiny"
    assert config["platform"] == "onnxruntime_onnx" and config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 16
    assert config["input"] == [{"name": "image", "data_type": "TYPE_FP32", "format": "FORMAT_NHWC",
                                "dims": ["8", "8", "3"]}]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": ["4"]}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": "300",
                                          "default_queue_policy": {"max_queue_size": 77}}
    assert config["instance_group"] == [{"name": "tiny", "kind": "KIND_CPU", "count": 3}]
    assert config["version_policy"] == {"latest": {"num_versions": 2}}


async def test_statistics_count_the_requests_sent_and_match_the_metrics(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_batch_size=4, max_queue_size=2)
    rows_per_request = [1, 2, 4, 3]
    before_ms = time.time_ns() // 1_000_000
    seen = await run_tritonclient(STATISTICS_SCRIPT, address(server), json.dumps(rows_per_request), "9")
    after_ms = time.time_ns() // 1_000_000
    assert seen["failure"].startswith("StatusCode.INVALID_ARGUMENT") and "max_queue_size 2" in seen["failure"]
    [stats] = seen["statistics"]["model_stats"]
    assert seen["every_model"]["model_stats"] == [stats]
    assert (stats["name"], stats["version"]) == ("tiny", "1")
    assert before_ms <= int(stats["last_inference"]) <= after_ms
    assert int(stats["inference_count"]) == sum(rows_per_request)
    # One client sending one request at a time: every request is a model call of its own.
    assert int(stats["execution_count"]) == len(rows_per_request)
    inference = {key: {field: int(value) for field, value in duration.items()}
                 for key, duration in stats["inference_stats"].items()}
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[key]["count"] == len(rows_per_request), key
    assert inference["fail"]["count"] == 1 and inference["fail"]["ns"] > 0
    assert inference["compute_infer"]["ns"] > 0
    assert inference["success"]["ns"] >= inference["queue"].get("ns", 0) + inference["compute_infer"]["ns"]
    batches = {int(batch["batch_size"]): int(batch["compute_infer"]["count"]) for batch in stats["batch_stats"]}
    assert batches == {rows: 1 for rows in rows_per_request}
    # The same measurements as /metrics, not a second clock.
    assert metric(server, 'convserve_compute_seconds_count{model="tiny"}') == len(rows_per_request)
    compute_ns = metric(server, 'convserve_compute_seconds_sum{model="tiny"}') * 1e9
    queue_ns = metric(server, 'convserve_queue_seconds_sum{model="tiny"}') * 1e9
    assert abs(inference["compute_infer"]["ns"] - compute_ns) <= len(rows_per_request)
    assert abs(inference["queue"].get("ns", 0) - queue_ns) <= len(rows_per_request)


async def test_repository_index_load_and_unload(tiny_repo, tiny_server, tmp_path):
    stage_model(tmp_path, tiny_repo, "other", 1, seed=7, labels=("x", "y", "z"))
    seen = await run_tritonclient(REPOSITORY_SCRIPT, address(tiny_server))
    assert seen["index_before"] == [
        {"name": "other", "version": "1", "state": "UNAVAILABLE", "reason": "not loaded yet"},
        {"name": "tiny", "version": "1", "state": "READY"},
    ]
    assert seen["load_absent"].startswith("StatusCode.NOT_FOUND") and "absent" in seen["load_absent"]
    assert seen["other_before_load"].startswith("StatusCode.NOT_FOUND")
    assert seen["other_ready"] is True
    image = np.full((1, 8, 8, 3), 0.5, np.float32)
    np.testing.assert_allclose(seen["other_probabilities"], reference(tiny_repo / "other/1/model.onnx", image),
                               atol=1e-6)
    assert seen["tiny_after_unload"].startswith("StatusCode.NOT_FOUND")
    assert seen["absent_ready"] is False and seen["tiny_ready_after_unload"] is False  # as Triton answers
    assert seen["index_after_unload"] == [
        {"name": "other", "version": "1", "state": "READY"},
        {"name": "tiny", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"},
    ]
    np.testing.assert_allclose(seen["tiny_after_reload"], reference(tiny_repo / "tiny/1/model.onnx", image), atol=1e-6)


async def wait_until_served(stub, name: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (await stub.ModelReady(pb.ModelReadyRequest(name=name))).ready:
                return
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        assert time.monotonic() < deadline, f"{name} was never served"
        await asyncio.sleep(0.05)


async def test_the_poller_leaves_an_unloaded_model_alone_until_it_is_loaded(tiny_repo, start_server, tmp_path):
    server = await start_server(tiny_repo, poll_interval_s=0.05)
    async with grpc.aio.insecure_channel(address(server)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="tiny"))
        stage_model(tmp_path, tiny_repo, "tiny", 2, seed=3)
        # Polls go through the models in name order: once "zz" is served, a poll has passed "tiny" by.
        stage_model(tmp_path, tiny_repo, "zz", 1)
        await wait_until_served(stub, "zz")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(infer_request(np.ones((1, 8, 8, 3), np.float32)))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [
            ("tiny", "2", "UNAVAILABLE", "unloaded"), ("zz", "1", "READY", "")]
        ready_only = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
        assert [m.name for m in ready_only.models] == ["zz"]
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"))
        response = await stub.ModelInfer(infer_request(np.ones((1, 8, 8, 3), np.float32)))
        assert response.model_version == "2"


async def test_load_and_unload_under_load_fail_no_request_that_was_accepted(tiny_repo, start_server, tmp_path):
    server = await start_server(tiny_repo, versions_per_model=1)
    async with grpc.aio.insecure_channel(address(server)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers: list[str] = []  # each request's model version, or its status code's name
        stop = asyncio.Event()
        request = infer_request(np.ones((2, 8, 8, 3), np.float32))

        async def keep_asking() -> None:
            while not stop.is_set():
                try:
                    answers.append((await stub.ModelInfer(request)).model_version)
                except grpc.aio.AioRpcError as exc:
                    answers.append(exc.code().name)

        async def until_answered(answer: str) -> int:
            start = len(answers)
            deadline = time.monotonic() + 30
            while answer not in answers[start:]:
                assert time.monotonic() < deadline, f"never answered {answer}; last: {answers[-5:]}"
                await asyncio.sleep(0.01)
            return start

        callers = [asyncio.ensure_future(keep_asking()) for _ in range(4)]
        await until_answered("1")
        stage_model(tmp_path, tiny_repo, "tiny", 2, seed=3)
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"))
        await until_answered("2")
        before_unload = len(answers)
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="tiny"))
        unloaded_at = len(answers)
        await until_answered("NOT_FOUND")
        deadline = time.monotonic() + 30
        while len(answers) < unloaded_at + 12:  # enough answers after the 4 in flight to judge
            assert time.monotonic() < deadline, f"callers stalled after the unload; last: {answers[-5:]}"
            await asyncio.sleep(0.01)
        before_reload = len(answers)
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"))
        await until_answered("2")
        stop.set()
        await asyncio.gather(*callers)
    # Never UNAVAILABLE or INTERNAL: a request is either answered by a loaded version or told NOT_FOUND.
    assert set(answers) <= {"1", "2", "NOT_FOUND"}, set(answers)
    assert "NOT_FOUND" not in answers[:before_unload]
    # Once the unload has returned, only the 4 callers' requests already in flight may still be answered.
    assert set(answers[unloaded_at + 4 : before_reload]) == {"NOT_FOUND"}


async def test_a_load_that_fails_leaves_the_served_version_serving(tiny_repo, tiny_server):
    broken = tiny_repo / "tiny" / "2" / "model.onnx"
    broken.parent.mkdir()
    broken.write_bytes(b"corrupt")
    async with grpc.aio.insecure_channel(address(tiny_server)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "refused tiny v2" in caught.value.details()
        assert (await stub.ModelInfer(infer_request(np.ones((1, 8, 8, 3), np.float32)))).model_version == "1"
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert [(m.name, m.version, m.state) for m in index.models] == [("tiny", "1", "READY")]


async def test_load_refuses_triton_config_overrides(tiny_server):
    async with grpc.aio.insecure_channel(address(tiny_server)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.RepositoryModelLoadRequest(model_name="tiny")
        request.parameters["config"].string_param = '{"max_batch_size": 2}'
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RepositoryModelLoad(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'config'" in caught.value.details()


async def test_tritonclient_streams_get_every_answer_by_id_and_errors_in_the_callback(tiny_repo, start_server):
    server = await start_server(tiny_repo)
    seen = await run_tritonclient(STREAM_SCRIPT, address(server))
    assert set(seen["results"]) == set(seen["unary"]) == {str(i) for i in range(20)}
    for key, probabilities in seen["results"].items():
        np.testing.assert_allclose(probabilities, seen["unary"][key], rtol=1e-6, atol=1e-7)
    [error] = seen["errors"]
    assert "INVALID_ARGUMENT: images must have shape" in error


async def test_tritonclient_class_count_returns_the_top_classes_with_their_labels(tiny_repo, start_server):
    server = await start_server(tiny_repo)
    seen = await run_tritonclient(CLASSIFICATION_SCRIPT, address(server))
    assert seen["shape"] == [3, 2]
    for row, probabilities in zip(seen["classes"], seen["probabilities"]):
        top = sorted(range(len(probabilities)), key=lambda index: -probabilities[index])[:2]
        assert [entry.split(":")[1:] for entry in row] == [[str(index), TINY_LABELS[index]] for index in top]
        assert [float(entry.split(":")[0]) for entry in row] == pytest.approx([probabilities[i] for i in top], abs=1e-6)


async def test_the_extensions_need_the_auth_token(tiny_repo, start_server):
    server = await start_server(tiny_repo, auth_token="s3cret")
    calls = [
        ("ModelConfig", pb.ModelConfigRequest(name="tiny")),
        ("ModelStatistics", pb.ModelStatisticsRequest(name="tiny")),
        ("RepositoryIndex", pb.RepositoryIndexRequest()),
        ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="tiny")),
        ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="tiny")),
    ]
    async with grpc.aio.insecure_channel(address(server)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for method, request in calls:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await getattr(stub, method)(request)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        for method, request in calls:
            await getattr(stub, method)(request, metadata=[("authorization", "Bearer s3cret")])


@pytest.fixture
def perf_analyzer() -> tuple[str, dict[str, str]]:
    """perf_analyzer from the tritonclient wheel, and an environment in which its libraries load; skips if not."""
    search_path = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")]))
    binary = shutil.which("perf_analyzer", path=search_path)
    if binary is None:
        pytest.skip("perf_analyzer not found: it ships in the tritonclient wheel (the dev extra)")
    try:
        import nvidia.cuda_runtime
    except ImportError:
        pytest.skip("perf_analyzer needs libcudart.so.12, from the nvidia-cuda-runtime-cu12 wheel (the dev extra)")
    cuda_lib = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
    library_path = os.pathsep.join(filter(None, [str(cuda_lib), os.environ.get("LD_LIBRARY_PATH")]))
    env = {**os.environ, "LD_LIBRARY_PATH": library_path}
    linked = subprocess.run(["ldd", binary], env=env, capture_output=True, text=True, check=False).stdout
    missing = [line.split()[0] for line in linked.splitlines() if "not found" in line]
    if missing:
        pytest.skip(f"perf_analyzer cannot load {', '.join(missing)}; libb64.so.0d is Debian's libb64-0d "
                    "(`make test` installs it where apt-get can)")
    return binary, env


@pytest.mark.parametrize("mode", [[], ["--streaming"]], ids=["unary", "streaming"])
async def test_perf_analyzer_measures_a_throughput(tmp_path, start_server, perf_analyzer, mode):
    binary, env = perf_analyzer
    # The digits model's input size, so that perf_analyzer's default random bytes surely include NaN, infinity and
    # huge values (1 float in 256 is NaN or infinity): a tensor API runs whatever it is sent, as Triton does.
    write_version(tmp_path, "digits", 1, height=28, width=28, labels=tuple("0123456789"))
    server = await start_server(tmp_path)
    # The command, plus three 1-second windows at most; -s 1000 accepts any spread between them, since a
    # shared test machine's load would make perf_analyzer's default 10% stability test fail for reasons that are
    # not the server's.
    process = await asyncio.create_subprocess_exec(
        binary, "-m", "digits", "-i", "grpc", "-u", address(server), "--concurrency-range", "8",
        "-p", "1000", "--max-trials", "3", "-s", "1000", *mode,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output = (await asyncio.wait_for(process.communicate(), 120))[0].decode()
    assert process.returncode == 0, output[-3000:]
    throughput = float(re.search(r"Throughput: ([\d.]+) infer/sec", output).group(1))
    assert throughput > 0, output
    client_requests = int(re.search(r"Request count: (\d+)", output).group(1))
    server_inferences = int(re.search(r"Inference count: (\d+)", output).group(1))
    # The server's counts come from statistics read before and after the window, the client's from the calls that
    # ended in it: they differ by the calls in flight at either edge, at most the concurrency at each.
    assert client_requests > 0 and abs(server_inferences - client_requests) <= 2 * 8, output
