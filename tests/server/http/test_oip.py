"""The Open Inference Protocol over HTTP: health, metadata, readiness and inference in JSON (flat and nested) and
in Triton's binary tensor form, its errors, and that HTTP shares the gRPC server's core, statistics and metrics."""

from __future__ import annotations

import asyncio
import http.client
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import orjson
import pytest

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server import errors
from convserve_server.config import ServerConfig
from convserve_server.http.errors import INTERNAL, status_for
from convserve_server.http.messages import OFF_LOOP_BYTES
from convserve_server.servicers.status import status_code_for
from tests.models import TINY_LABELS, write_version
from tests.server.http.serving import ServerThread, running_server
from tests.server.test_server import infer_request, metric, reference

BATCH = np.random.default_rng(3).random((2, 8, 8, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("http-oip") / "models"
    write_version(repository, "tiny", 1)
    write_version(repository, "tiny", 2, seed=5)
    return repository


@pytest.fixture(scope="module")
def served(repository: Path) -> Iterator[ServerThread]:
    with running_server(repository, versions_per_model=2) as server:
        yield server


def json_request(batch: np.ndarray, nested: bool = False, **fields: object) -> dict:
    data = batch.tolist() if nested else batch.ravel().tolist()
    return {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(batch.shape), "data": data}], **fields}


def binary_request(batch: np.ndarray, outputs: list | None = None, **parameters: object) -> tuple[bytes, dict]:
    header = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(batch.shape),
                          "parameters": {"binary_data_size": batch.nbytes}}]}
    if outputs is not None:
        header["outputs"] = outputs
    if parameters:
        header["parameters"] = parameters
    text = orjson.dumps(header)
    return text + batch.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(text)),
                                                  "Content-Type": "application/octet-stream"}


def test_the_default_http_port_is_tritons():
    assert ServerConfig.model_fields["http_port"].default == 8000


def test_health_and_server_metadata(served):
    assert (served.request("GET", "/v2/health/live").status, served.request("GET", "/v2/health/live").json()) == \
        (200, {"live": True})
    ready = served.request("GET", "/v2/health/ready")
    assert (ready.status, ready.json()) == (200, {"ready": True})
    metadata = served.request("GET", "/v2").json()
    assert metadata["name"] == "convserve"
    assert {"binary_tensor_data", "classification", "model_configuration", "statistics", "model_repository",
            "classify"} <= set(metadata["extensions"])


def test_model_metadata_and_readiness_with_and_without_a_version(served):
    newest = served.request("GET", "/v2/models/tiny").json()
    assert newest["name"] == "tiny" and newest["versions"] == ["1", "2"]
    assert newest["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8, 3]}]
    assert newest["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]}]
    assert newest["parameters"]["version"] == "2"
    assert newest["parameters"]["execution_provider"] == "CPUExecutionProvider"
    assert orjson.loads(newest["parameters"]["labels"]) == list(TINY_LABELS)
    assert served.request("GET", "/v2/models/tiny/versions/1").json()["parameters"]["version"] == "1"
    ready = served.request("GET", "/v2/models/tiny/versions/1/ready")
    assert (ready.status, ready.json()) == (200, {"name": "tiny", "ready": True})
    assert served.request("GET", "/v2/models/tiny/ready").status == 200


@pytest.mark.parametrize("path", ["/v2/models/absent", "/v2/models/tiny/versions/9", "/v2/models/absent/ready",
                                  "/v2/models/tiny/versions/x/infer"])
def test_an_unknown_model_or_version_is_404_with_an_error_object(served, path):
    answer = served.request("POST" if path.endswith("infer") else "GET", path, b"{}" if path.endswith("infer") else None)
    assert answer.status == 404
    assert answer.headers["content-type"] == "application/json"
    assert set(answer.json()) == {"error"} and answer.json()["error"]


def test_json_tensors_flat_and_nested_give_the_models_output(served, repository):
    expected = reference(repository / "tiny" / "2" / "model.onnx", BATCH)
    for nested in (False, True):
        answer = served.post_json("/v2/models/tiny/infer", json_request(BATCH, nested, id="req-7"))
        assert answer.status == 200, answer.body
        body = answer.json()
        assert (body["model_name"], body["model_version"], body["id"]) == ("tiny", "2", "req-7")
        [output] = body["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("probabilities", "FP32", [2, 4])
        np.testing.assert_allclose(np.array(output["data"]).reshape(2, 4), expected, rtol=1e-5)


def test_a_large_json_body_parsed_on_a_thread_gives_the_same_answers_and_errors(served, repository):
    batch = np.random.default_rng(8).random((64, 8, 8, 3), dtype=np.float32)
    body = orjson.dumps(json_request(batch, nested=True), option=orjson.OPT_INDENT_2)
    assert len(body) >= OFF_LOOP_BYTES
    answer = served.request("POST", "/v2/models/tiny/infer", body, {"Content-Type": "application/json"})
    assert answer.status == 200, answer.body
    np.testing.assert_allclose(np.array(answer.json()["outputs"][0]["data"]).reshape(64, 4),
                               reference(repository / "tiny" / "2" / "model.onnx", batch), rtol=1e-5)
    broken = served.request("POST", "/v2/models/tiny/infer", body[:-2], {"Content-Type": "application/json"})
    assert broken.status == 400 and "not valid JSON" in broken.json()["error"]


def test_a_version_in_the_path_is_the_version_that_answers(served, repository):
    answer = served.post_json("/v2/models/tiny/versions/1/infer", json_request(BATCH))
    assert answer.json()["model_version"] == "1"
    np.testing.assert_allclose(np.array(answer.json()["outputs"][0]["data"]).reshape(2, 4),
                               reference(repository / "tiny" / "1" / "model.onnx", BATCH), rtol=1e-5)


def test_binary_tensors_in_and_out(served, repository):
    expected = reference(repository / "tiny" / "2" / "model.onnx", BATCH)
    body, headers = binary_request(BATCH, outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}])
    answer = served.request("POST", "/v2/models/tiny/infer", body, headers)
    assert answer.status == 200, answer.body
    length = int(answer.headers["inference-header-content-length"])
    header = orjson.loads(answer.body[:length])
    [output] = header["outputs"]
    assert output["parameters"]["binary_data_size"] == 32 and "data" not in output
    np.testing.assert_array_equal(np.frombuffer(answer.body[length:], "<f4").reshape(2, 4), expected)
    # binary_data_output asks for every output in binary; without it the output comes as JSON.
    body, headers = binary_request(BATCH, binary_data_output=True)
    assert "inference-header-content-length" in served.request("POST", "/v2/models/tiny/infer", body, headers).headers
    body, headers = binary_request(BATCH)
    as_json = served.request("POST", "/v2/models/tiny/infer", body, headers)
    assert "inference-header-content-length" not in as_json.headers
    np.testing.assert_allclose(np.array(as_json.json()["outputs"][0]["data"]).reshape(2, 4), expected, rtol=1e-6)


def test_tritons_classification_parameter_gives_the_top_classes(served, repository):
    expected = reference(repository / "tiny" / "2" / "model.onnx", BATCH)
    request = json_request(BATCH, outputs=[{"name": "probabilities", "parameters": {"classification": 2}}])
    [output] = served.post_json("/v2/models/tiny/infer", request).json()["outputs"]
    assert (output["datatype"], output["shape"]) == ("BYTES", [2, 2])
    for row, probabilities in enumerate(expected):
        best = int(np.argmax(probabilities))
        value, index, label = output["data"][row * 2].split(":")
        assert (int(index), label) == (best, TINY_LABELS[best])
        assert float(value) == pytest.approx(probabilities[best], abs=1e-6)


@pytest.mark.parametrize("request_body, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (orjson.dumps(json_request(BATCH[:1]) | {"inputs": []}), "exactly one input"),
    (orjson.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8, 8, 3], "data": [0.0]}]}),
     "unknown input 'pixels'"),
    (orjson.dumps({"inputs": [{"name": "image", "datatype": "INT8", "shape": [1, 8, 8, 3], "data": [0]}]}),
     "must be FP32"),
    (orjson.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 8, 8, 3], "data": [0.5] * 5}]}),
     "5 values do not match shape [1, 8, 8, 3]"),
    (orjson.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 8, 8, 3], "data": ["a"] * 192}]}),
     "data must be numbers"),
    (orjson.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 8, 8], "data": [0.5] * 64}]}),
     "shape must have 4 dimensions"),
    (orjson.dumps(json_request(BATCH[:1], outputs=[{"name": "probabilities", "parameters": {"classification": 0}}])),
     "at least 1"),
])
def test_a_bad_request_is_400_with_the_reason(served, request_body, message):
    answer = served.request("POST", "/v2/models/tiny/infer", request_body, {"Content-Type": "application/json"})
    assert answer.status == 400, answer.body
    assert message in answer.json()["error"]


def test_binary_sizes_that_do_not_add_up_are_400(served):
    body, headers = binary_request(BATCH)
    short = served.request("POST", "/v2/models/tiny/infer", body[:-4], headers)
    assert short.status == 400 and "binary_data_size" in short.json()["error"]
    wrong_header = served.request("POST", "/v2/models/tiny/infer", body,
                                  {**headers, "Inference-Header-Content-Length": str(len(body) + 1)})
    assert wrong_header.status == 400 and "Inference-Header-Content-Length" in wrong_header.json()["error"]


@pytest.mark.parametrize("length", ["\u00b2", "\u00b3", "9" * 5000])
def test_a_header_length_that_is_no_ascii_count_is_400(served, length):
    """"²".isdigit() is true but int("²") raises: each was a 500."""
    body, headers = binary_request(BATCH)
    answer = served.request("POST", "/v2/models/tiny/infer", body,
                            {**headers, "Inference-Header-Content-Length": length})
    assert answer.status == 400, answer.body
    assert "Inference-Header-Content-Length" in answer.json()["error"]


def test_tritons_timeout_parameter_sets_the_deadline(served):
    late = served.post_json("/v2/models/tiny/infer", json_request(BATCH, parameters={"timeout": 1}))
    assert late.status == 504 and "deadline" in late.json()["error"]
    in_time = served.post_json("/v2/models/tiny/infer", json_request(BATCH, parameters={"timeout": 10_000_000}))
    assert in_time.status == 200, in_time.body
    for timeout in (-1, "soon", True):
        bad = served.post_json("/v2/models/tiny/infer", json_request(BATCH, parameters={"timeout": timeout}))
        assert bad.status == 400 and "timeout parameter" in bad.json()["error"]


def test_an_unknown_output_is_404_as_over_grpc(served):
    answer = served.post_json("/v2/models/tiny/infer", json_request(BATCH[:1], outputs=[{"name": "logits"}]))
    assert answer.status == 404 and "unknown output 'logits'" in answer.json()["error"]


def test_unknown_paths_and_methods(served):
    assert served.request("GET", "/v3/anything").status == 404
    wrong_method = served.request("GET", "/v2/models/tiny/infer")
    assert wrong_method.status == 405 and "POST" in wrong_method.json()["error"]


def test_every_domain_error_has_its_own_status():
    statuses = {error: status_for(error("x")).http for error in errors.ServingError.__subclasses__()}
    assert INTERNAL.http not in statuses.values(), statuses
    assert statuses[errors.InvalidInput] == 400 and statuses[errors.ModelNotFound] == 404
    assert statuses[errors.Overloaded] == 429 and statuses[errors.ModelNotReady] == 503


def test_each_domain_error_is_counted_under_grpcs_code():
    for error in errors.ServingError.__subclasses__():
        assert status_for(error("x")).code == status_code_for(error("x")).name, error


def test_a_load_that_fails_counts_as_failed_precondition_over_both_protocols(served, repository):
    counted = 'convserve_requests_total{code="FAILED_PRECONDITION",method="RepositoryModelLoad",model="tiny"}'
    before = metric(served.server, counted)
    broken = repository / "tiny" / "3"
    broken.mkdir()
    try:
        (broken / "model.onnx").write_bytes(b"corrupt")
        answer = served.request("POST", "/v2/repository/models/tiny/load", b"{}", {"Content-Type": "application/json"})
        assert answer.status == 400 and "refused tiny v3" in answer.json()["error"]
        with grpc.insecure_channel(f"127.0.0.1:{served.server.port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(model_name="tiny"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        shutil.rmtree(broken)
    assert metric(served.server, counted) == before + 2


def test_http_and_grpc_requests_share_the_statistics_and_the_metrics(served):
    def inferences() -> int:
        stats = served.request("GET", "/v2/models/tiny/versions/2/stats").json()["model_stats"]
        return stats[0]["inference_count"]

    before = inferences()
    ok = 'convserve_requests_total{code="OK",method="ModelInfer",model="tiny"}'
    counted_before = metric(served.server, ok)
    assert served.post_json("/v2/models/tiny/infer", json_request(BATCH)).status == 200
    with grpc.insecure_channel(f"127.0.0.1:{served.server.port}") as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(BATCH), timeout=10)
    assert inferences() == before + 4  # two images over HTTP, two over gRPC
    assert metric(served.server, ok) == counted_before + 2


def test_a_draining_server_holds_then_refuses_new_http_calls_with_503(repository):
    with running_server(repository) as server:
        gate = server.server.core.shutdown_gate
        server.call(_close(gate))
        answers = []
        caller = threading.Thread(target=lambda: answers.append(
            server.post_json("/v2/models/tiny/infer", json_request(BATCH))))
        caller.start()
        deadline = time.monotonic() + 10
        while gate.held < 1 and time.monotonic() < deadline:  # polled: the call reaches the gate and waits there
            time.sleep(0.01)
        assert gate.held == 1
        server.call(_release(gate))
        caller.join(10)
        assert answers[0].status == 503 and "shutting down" in answers[0].json()["error"]
        assert server.request("GET", "/v2/health/live").status == 200  # health is never gated


def test_during_the_drain_delay_ready_is_503_and_calls_are_answered_then_the_port_closes(repository):
    with running_server(repository) as server:
        stopping = asyncio.run_coroutine_threadsafe(server.server.shutdown(grace_s=5, drain_delay_s=30), server.loop)
        deadline = time.monotonic() + 10
        while server.request("GET", "/v2/health/ready").status != 503 and time.monotonic() < deadline:
            time.sleep(0.01)  # shutdown begins on the server's loop: polled until it shows
        assert server.request("GET", "/v2/health/ready").json() == {"ready": False}
        assert server.post_json("/v2/models/tiny/infer", json_request(BATCH)).status == 200  # still answered
        assert server.request("GET", "/v2/models/tiny/ready").status == 503
        server.loop.call_soon_threadsafe(server.server.hurry)
        stopping.result(15)
        with pytest.raises(ConnectionError):
            server.request("GET", "/v2/health/live")


async def _close(gate) -> None:
    gate.close()


async def _release(gate) -> None:
    gate.release()


def test_starting_the_http_front_end_leaves_the_logging_setup_alone(repository):
    """The server's own logging setup (cli.py) quiets uvicorn's warnings; the library changes no global logger."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    level = uvicorn_log.level
    uvicorn_log.setLevel(logging.DEBUG)
    try:
        with running_server(repository):
            assert uvicorn_log.level == logging.DEBUG
    finally:
        uvicorn_log.setLevel(level)


def test_a_keep_alive_connection_is_not_held_up_by_nagles_algorithm(served):
    """Without TCP_NODELAY a response's body waited for the client's delayed ACK of its headers: 44 ms a request."""
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    body = orjson.dumps(json_request(BATCH[:1]))
    took = []
    try:
        for _ in range(12):
            started = time.monotonic()
            connection.request("POST", "/v2/models/tiny/infer", body, {"Content-Type": "application/json"})
            assert connection.getresponse().read()
            took.append(time.monotonic() - started)
    finally:
        connection.close()
    assert sorted(took)[len(took) // 2] < 0.02, took
