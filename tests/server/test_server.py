"""The real server on a free port, over real channels: both services, health, errors, batching, drain."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request

import grpc
import grpc.aio
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from convserve_protocol.protos import classifier_pb2 as cpb
from convserve_protocol.protos import classifier_pb2_grpc as cpb_grpc
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.models import TINY_LABELS

SHAPE = (8, 8, 3)


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def reference(model_path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": batch})[0]


def infer_request(batch: np.ndarray, raw: bool = True, **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=fields.pop("model_name", "tiny"), **fields)
    tensor = request.inputs.add(name="image", datatype="FP32", shape=list(batch.shape))
    if raw:
        request.raw_input_contents.append(batch.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(batch.ravel().tolist())
    return request


def classify_request(batch: np.ndarray, **fields) -> cpb.ClassifyRequest:
    return cpb.ClassifyRequest(images=batch.astype("<f4").tobytes(), shape=list(batch.shape), **fields)


@pytest.fixture
async def channel(tiny_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tiny_server.port}") as chan:
        yield chan


def metric(server, name: str) -> float:
    """One sample's value from the server's /metrics page (0 if absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    return sum(values)


async def test_liveness_readiness_and_server_metadata(channel):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert (await stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="tiny"))).ready
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="tiny", version="1"))).ready
    metadata = await stub.ServerMetadata(pb.ServerMetadataRequest())
    assert metadata.name == "convserve" and metadata.version
    assert "convserve.v1.Classifier" in metadata.extensions


async def test_model_metadata_describes_tensors_versions_and_provider(channel):
    metadata = await pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name="tiny"))
    assert metadata.name == "tiny" and list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    assert (metadata.inputs[0].name, metadata.inputs[0].datatype, list(metadata.inputs[0].shape)) == ("image", "FP32", [-1, 8, 8, 3])
    assert (metadata.outputs[0].name, list(metadata.outputs[0].shape)) == ("probabilities", [-1, len(TINY_LABELS)])
    assert metadata.parameters["execution_provider"].string_param == "CPUExecutionProvider"
    assert json.loads(metadata.parameters["labels"].string_param) == list(TINY_LABELS)


@pytest.mark.parametrize("raw", [True, False], ids=["raw_input_contents", "typed_contents"])
async def test_model_infer_equals_onnx_runtime_in_process(channel, tiny_repo, raw):
    batch = images(5)
    response = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(batch, raw=raw, id="req-7"))
    assert response.id == "req-7" and response.model_version == "1"
    output = response.outputs[0]
    assert output.name == "probabilities" and list(output.shape) == [5, len(TINY_LABELS)]
    if raw:
        result = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(5, -1)
    else:
        result = np.asarray(output.contents.fp32_contents, dtype=np.float32).reshape(5, -1)
    np.testing.assert_allclose(result, reference(tiny_repo / "tiny/1/model.onnx", batch), rtol=0, atol=1e-6)


async def test_classify_returns_top_k_labels_and_probabilities(channel, tiny_repo):
    batch = images(3)
    expected = reference(tiny_repo / "tiny/1/model.onnx", batch)
    response = await cpb_grpc.ClassifierStub(channel).Classify(
        classify_request(batch, top_k=2, include_probabilities=True)
    )
    assert response.model_name == "tiny" and len(response.results) == 3
    for row, result in zip(expected, response.results):
        best = np.argsort(-row)[:2]
        assert [p.class_index for p in result.top_k] == best.tolist()
        assert [p.label for p in result.top_k] == [TINY_LABELS[i] for i in best]
        np.testing.assert_allclose([p.score for p in result.top_k], row[best], atol=1e-6)
        np.testing.assert_allclose(result.probabilities, row, atol=1e-6)


async def test_get_model_info_carries_labels_and_preprocessing(channel):
    info = await cpb_grpc.ClassifierStub(channel).GetModelInfo(cpb.GetModelInfoRequest())
    assert info.name == "tiny" and list(info.labels) == list(TINY_LABELS)
    assert (info.height, info.width, info.channels, info.max_batch_size) == (8, 8, 3, 64)
    assert json.loads(info.preprocessing_json)["height"] == 8
    assert json.loads(info.model_card_json)["convserve.dataset"] == "synthetic"


async def test_health_service_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService", "convserve.v1.Classifier"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    services = {s.name async for response in stream for s in response.list_services_response.service}
    assert {"inference.GRPCInferenceService", "convserve.v1.Classifier", "grpc.health.v1.Health"} <= services


TRITON_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
client = triton.InferenceServerClient(sys.argv[1])
batch = np.asarray(json.loads(sys.argv[2]), dtype=np.float32)
infer_input = triton.InferInput("image", list(batch.shape), "FP32")
infer_input.set_data_from_numpy(batch)
result = client.infer("tiny", [infer_input], outputs=[triton.InferRequestedOutput("probabilities")])
print(json.dumps({
    "live": client.is_server_live(), "ready": client.is_server_ready(), "model_ready": client.is_model_ready("tiny"),
    "input": client.get_model_metadata("tiny").inputs[0].name,
    "probabilities": result.as_numpy("probabilities").tolist(),
}))
"""


async def test_standard_tritonclient_works_unchanged(tiny_server, tiny_repo):
    # tritonclient registers its own copy of the "inference" protos, which would clash with ours in one
    # process: it runs in a process of its own, exactly as a user's program would.
    batch = images(4)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TRITON_SCRIPT, f"127.0.0.1:{tiny_server.port}", json.dumps(batch.tolist()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    answer = json.loads(stdout)
    assert answer["live"] and answer["ready"] and answer["model_ready"] and answer["input"] == "image"
    np.testing.assert_allclose(answer["probabilities"], reference(tiny_repo / "tiny/1/model.onnx", batch), atol=1e-6)


@pytest.mark.parametrize(
    ("mutate", "code", "message"),
    [
        (lambda r: setattr(r.inputs[0], "datatype", "INT32"), grpc.StatusCode.INVALID_ARGUMENT, "must be FP32"),
        (lambda r: r.inputs[0].shape.__setitem__(0, 3), grpc.StatusCode.INVALID_ARGUMENT, "bytes do not match"),
        (lambda r: r.inputs[0].shape.__setitem__(1, 9), grpc.StatusCode.INVALID_ARGUMENT, "bytes do not match"),
        (lambda r: r.inputs[0].shape.__setitem__(0, 0), grpc.StatusCode.INVALID_ARGUMENT, "must be positive"),
        (lambda r: r.inputs[0].shape.__setitem__(0, -2), grpc.StatusCode.INVALID_ARGUMENT, "must be positive"),
        (lambda r: r.inputs[0].shape.pop(), grpc.StatusCode.INVALID_ARGUMENT, "4 dimensions"),
        (lambda r: r.inputs[0].shape.__setitem__(0, 10**12), grpc.StatusCode.INVALID_ARGUMENT, "bytes do not match"),
        (lambda r: setattr(r.inputs[0], "name", "pixels"), grpc.StatusCode.INVALID_ARGUMENT, "unknown input"),
        (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "unknown model"),
        (lambda r: setattr(r, "model_version", "7"), grpc.StatusCode.NOT_FOUND, "no loaded version"),
        (lambda r: r.outputs.add(name="logits"), grpc.StatusCode.NOT_FOUND, "unknown output"),
        (lambda r: r.raw_input_contents.append(b"x"), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents for"),
    ],
    ids=["dtype", "batch-vs-bytes", "dim-vs-bytes", "zero-dim", "negative-dim", "rank", "billions", "input-name",
         "model", "version", "output", "extra-raw"],
)
async def test_model_infer_rejects_bad_requests_clearly(channel, mutate, code, message):
    request = infer_request(images(2))
    mutate(request)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert caught.value.code() == code
    assert message in caught.value.details()


async def test_classify_rejects_empty_nonfinite_and_bad_top_k(channel):
    stub = cpb_grpc.ClassifierStub(channel)
    bad_values = images(2)
    bad_values[1, 0, 0, 0] = np.nan
    cases = [
        (cpb.ClassifyRequest(images=b"", shape=[0, 8, 8, 3]), "must be positive"),
        (classify_request(bad_values), "NaN or infinity"),
        (classify_request(images(1), top_k=99), "top_k must be between 1 and 4"),
        (classify_request(images(1), model_name="nope"), "unknown model"),
    ]
    for request, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Classify(request)
        assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        assert message in caught.value.details()
    # and the server still answers good requests
    assert len((await stub.Classify(classify_request(images(2)))).results) == 2


async def send_at_once_and_check_each_caller_gets_its_rows(server, tiny_repo, batches: list[np.ndarray]) -> None:
    """Send every batch at once, each as one request; each answer must be its own batch's probabilities."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        stub = pb_grpc.GRPCInferenceServiceStub(chan)
        responses = await asyncio.gather(*(stub.ModelInfer(infer_request(b)) for b in batches))
    for batch, response in zip(batches, responses):
        result = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(len(batch), -1)
        np.testing.assert_allclose(result, reference(tiny_repo / "tiny/1/model.onnx", batch), atol=1e-6)


async def test_concurrent_requests_share_model_calls_and_each_caller_gets_its_rows(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_queue_delay_us=200_000, max_batch_size=64)
    batches = [images(i + 1, seed=i) for i in range(12)]
    await send_at_once_and_check_each_caller_gets_its_rows(server, tiny_repo, batches)
    model_calls = metric(server, 'convserve_batch_size_count{model="tiny"}')
    assert 1 <= model_calls < len(batches)
    assert metric(server, 'convserve_batch_size_sum{model="tiny"}') == sum(len(b) for b in batches)


async def test_request_larger_than_max_batch_is_split_and_reassembled(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_batch_size=4)
    batch = images(10)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        response = await pb_grpc.GRPCInferenceServiceStub(chan).ModelInfer(infer_request(batch))
    result = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(10, -1)
    np.testing.assert_allclose(result, reference(tiny_repo / "tiny/1/model.onnx", batch), atol=1e-6)
    assert metric(server, 'convserve_batch_size_count{model="tiny"}') == 3


async def test_two_model_instances_answer_every_caller_with_its_own_rows(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_batch_size=4, model_instances=2)
    batches = [images(4 + i % 9, seed=i) for i in range(24)]  # full batches queue while others compute
    await send_at_once_and_check_each_caller_gets_its_rows(server, tiny_repo, batches)
    assert metric(server, 'convserve_batch_size_sum{model="tiny"}') == sum(len(b) for b in batches)


async def test_full_queue_answers_resource_exhausted_at_once(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_queue_size=2, max_queue_delay_us=2_000_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        stub = pb_grpc.GRPCInferenceServiceStub(chan)
        queued = [asyncio.ensure_future(stub.ModelInfer(infer_request(images(1)))) for _ in range(2)]
        while metric(server, 'convserve_queue_depth{model="tiny"}') < 2:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(infer_request(images(1)))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert loop.time() - started < 1.0, "rejection must not wait for the queue"
        assert all(len(r.outputs) == 1 for r in await asyncio.gather(*queued))


async def test_a_request_larger_than_the_empty_queue_holds_is_invalid_not_retry_later(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_batch_size=2, max_queue_size=3, max_queue_delay_us=1_000_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        stub = pb_grpc.GRPCInferenceServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # on an idle server: retrying could never help
            await stub.ModelInfer(infer_request(images(7)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_queue_size 3" in caught.value.details() and "at most 6 images" in caught.value.details()
        assert len((await stub.ModelInfer(infer_request(images(6)))).outputs) == 1  # the limit itself fits
        queued = asyncio.ensure_future(stub.ModelInfer(infer_request(images(1))))
        while metric(server, 'convserve_queue_depth{model="tiny"}') < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # would fit once the queue empties: retry later
            await stub.ModelInfer(infer_request(images(6)))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(infer_request(images(7)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len((await queued).outputs) == 1


async def test_expired_deadline_is_dropped_before_compute(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_queue_delay_us=500_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        stub = pb_grpc.GRPCInferenceServiceStub(chan)
        await stub.ServerReady(pb.ServerReadyRequest())  # connected: the 0.1 s below is spent in the queue
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(infer_request(images(1)), timeout=0.1)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        depth = 'convserve_queue_depth{model="tiny"}'
        queued_before = await asyncio.to_thread(metric, server, depth)  # the expired call stays until the delay ends
        call = stub.ModelInfer(infer_request(images(1)))
        deadline = asyncio.get_running_loop().time() + 10
        while await asyncio.to_thread(metric, server, depth) <= queued_before:
            assert asyncio.get_running_loop().time() < deadline, "the call never reached the queue"
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        deadline = asyncio.get_running_loop().time() + 10
        while await asyncio.to_thread(metric, server, depth) > 0:  # until taken
            assert asyncio.get_running_loop().time() < deadline, "the queue delay never ended"
            await asyncio.sleep(0.02)
        assert metric(server, 'convserve_batch_size_count{model="tiny"}') == 0
        assert len((await stub.ModelInfer(infer_request(images(1)))).outputs) == 1


async def test_health_is_not_serving_until_warmed(tiny_repo, start_server):
    server = await start_server(tiny_repo, warm=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        health = health_pb2_grpc.HealthStub(chan)
        stub = pb_grpc.GRPCInferenceServiceStub(chan)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(infer_request(images(1)))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        await server.warm_up()
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready


async def test_shutdown_answers_every_accepted_request_and_refuses_new_ones(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_queue_delay_us=300_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        stub = pb_grpc.GRPCInferenceServiceStub(chan)
        watch = health_pb2_grpc.HealthStub(chan).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        in_flight = [asyncio.ensure_future(stub.ModelInfer(infer_request(images(1, seed=i)))) for i in range(8)]
        while metric(server, 'convserve_queue_depth{model="tiny"}') < 8:
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(server.shutdown(grace_s=5))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        responses = await asyncio.gather(*in_flight)
        assert all(list(r.outputs[0].shape) == [1, len(TINY_LABELS)] for r in responses)
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(infer_request(images(1)), timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.stopped


async def test_draining_core_refuses_new_requests_as_unavailable(tiny_server, channel):
    await tiny_server.core.drain()
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(infer_request(images(1)))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in caught.value.details()
    assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready


async def test_metrics_count_requests_by_status_code(tiny_server, channel):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    await stub.ModelInfer(infer_request(images(2)))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ModelInfer(infer_request(images(2), model_name="nope"))
    assert metric(tiny_server, 'convserve_requests_total{code="OK",method="ModelInfer",model="tiny"}') == 1
    assert metric(tiny_server, 'convserve_requests_total{code="NOT_FOUND",method="ModelInfer",model="unknown"}') == 1
    assert metric(tiny_server, 'convserve_compute_seconds_count{model="tiny"}') >= 1
    assert metric(tiny_server, 'convserve_queue_seconds_count{model="tiny"}') >= 1
