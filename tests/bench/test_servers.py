"""The reference servers, started as the benchmark starts them, answer as they should."""

from __future__ import annotations

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from convserve_bench.processes import ChildServer, ServerExited
from convserve_bench.rpc import infer_request
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc

REFERENCE_SERVERS = "convserve_bench.servers"


def _infer(address: str, batch: np.ndarray) -> tuple[str, np.ndarray]:
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(batch, "tiny", "image"), timeout=10)
    output = response.outputs[0]
    return output.name, np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(output.shape))


def test_the_naive_server_answers_what_onnx_runtime_computes(tiny_repo):
    model_path = tiny_repo / "tiny" / "1" / "model.onnx"
    batch = np.random.default_rng(1).random((3, 8, 8, 3), dtype=np.float32)
    expected = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"image": batch})[0]
    with ChildServer(REFERENCE_SERVERS, "naive", "--model-path", str(model_path)) as naive:
        name, answer = _infer(naive.address, batch)
    assert name == "probabilities"
    np.testing.assert_allclose(answer, expected, atol=1e-6)


def test_the_do_nothing_server_answers_zeros_of_the_shape_it_is_told():
    with ChildServer(REFERENCE_SERVERS, "noop", "--classes", "7", "--output-name", "scores") as noop:
        name, answer = _infer(noop.address, np.ones((5, 8, 8, 3), np.float32))
        with grpc.insecure_channel(noop.address) as channel:
            request = infer_request(np.ones((2, 8, 8, 3), np.float32), "tiny", "image")
            request.raw_input_contents[0] = request.raw_input_contents[0][:-4]  # one value short
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert name == "scores"
    assert answer.shape == (5, 7) and not answer.any()
    assert caught.value.code() == grpc.StatusCode.UNKNOWN  # it decodes the request, so bad bytes fail


def test_a_reference_server_that_cannot_start_says_why():
    with pytest.raises(ServerExited) as caught:
        with ChildServer(REFERENCE_SERVERS, "naive", "--model-path", "/nonexistent/model.onnx"):
            pass
    assert caught.value.returncode != 0
    assert "/nonexistent/model.onnx" in caught.value.one_line()
