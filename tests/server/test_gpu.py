"""The CUDA execution provider on a real GPU: every node on CUDA, CPU-equal outputs, a server answering on ``--device cuda``.

Skipped, with the reason, wherever ONNX Runtime cannot run a convolution on CUDA. Needs no TensorFlow, so that
``pytest -m gpu tests/server/test_gpu.py`` runs on a GPU machine that has only the server's dependencies and onnx.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server.runtime import CPU, CUDA, DeviceRequest, OnnxModel, cuda_provider_options

from tests.gpu import cuda_unusable
from tests.models import conv_model, write_version
from convserve_bench.processes import ServerProcess

BATCH = 64


UNUSABLE = cuda_unusable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(UNUSABLE is not None, reason=str(UNUSABLE))]


@pytest.fixture
def conv_repo(tmp_path: Path) -> Path:
    write_version(tmp_path, "conv", 1, conv_model())
    return tmp_path


@pytest.fixture
def batch() -> np.ndarray:
    return np.random.default_rng(7).random((BATCH, 32, 32, 3), dtype=np.float32)


def test_every_node_runs_on_cuda_with_the_projects_options(conv_repo, batch, tmp_path):
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(conv_repo / "conv/1/model.onnx"), options,
                                   providers=[(CUDA, cuda_provider_options(0)), CPU])
    assert session.get_provider_options()[CUDA]["use_tf32"] == "0"
    for _ in range(2):
        session.run(None, {"image": batch})
    events = json.loads(Path(session.end_profiling()).read_text())
    placed = Counter(event["args"]["provider"] for event in events
                     if event.get("cat") == "Node" and "provider" in event.get("args", {}))
    assert placed and set(placed) == {CUDA}, placed


def test_cuda_outputs_equal_cpu_outputs(conv_repo, batch):
    path = conv_repo / "conv/1/model.onnx"
    cuda = OnnxModel.load(path, DeviceRequest("cuda"))
    cpu = OnnxModel.load(path, DeviceRequest("cpu"))
    assert cuda.provider == CUDA
    np.testing.assert_allclose(cuda.run(batch), cpu.run(batch), rtol=0, atol=1e-5)


def test_the_server_answers_over_grpc_on_cuda(conv_repo, batch):
    expected = OnnxModel.load(conv_repo / "conv/1/model.onnx", DeviceRequest("cpu")).run(batch)
    request = pb.ModelInferRequest(model_name="conv")
    request.inputs.add(name="image", datatype="FP32", shape=list(batch.shape))
    request.raw_input_contents.append(batch.astype("<f4").tobytes())
    with ServerProcess(conv_repo, "--device", "cuda", "--max-batch-size", str(BATCH)) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="conv"), timeout=10)
        response = stub.ModelInfer(request, timeout=30)
    assert metadata.parameters["execution_provider"].string_param == CUDA
    got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(BATCH, -1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
