"""Self-verifying model files: the server runs the golden vectors on its provider before it serves a version."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from convserve_client import AsyncClient
from convserve_protocol.model_card import ModelCard
from convserve_client.preprocessing import PreprocessingSpec
from convserve_protocol.protos import classifier_pb2, classifier_pb2_grpc
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server.errors import StartupError
from convserve_server.runtime import CPU, CUDA, DeviceRequest, OnnxModel, cuda_provider_options
from convserve_server.verification import measure
from tests.gpu import cuda_unusable
from tests.models import tiny_model, with_golden, with_one_weight_changed, write_version
from convserve_bench.processes import ServerExited, ServerProcess

ERROR_PREFIX = "convserve-serve: error:"


def install_version(repository: Path, name: str, version: int, model_bytes: bytes) -> Path:
    """Put a version into the repository in one rename, as the exporter does, so a watcher never reads half a file."""
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    (staging / "model.onnx").write_bytes(model_bytes)
    final = model_dir / str(version)
    os.rename(staging, final)
    return final / "model.onnx"


@pytest.fixture
def digits_repo(tmp_path: Path, default_training) -> Path:
    """A repository holding a copy of the default training run's file as digits v1."""
    repository = tmp_path / "models"
    install_version(repository, "digits", 1, default_training.model_path.read_bytes())
    return repository


@pytest.fixture
def tampered_digits(default_training) -> bytes:
    """The default training run's file with one weight changed and its card (golden vectors included) left alone."""
    return with_one_weight_changed(onnx.load(str(default_training.model_path))).SerializeToString()


def model_info(address: str, name: str = "") -> classifier_pb2.ModelInfo:
    with grpc.insecure_channel(address) as channel:
        return classifier_pb2_grpc.ClassifierStub(channel).GetModelInfo(
            classifier_pb2.GetModelInfoRequest(model_name=name), timeout=10)


def metadata_parameters(address: str, name: str) -> dict[str, object]:
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10)
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in response.parameters.items()}


async def test_a_default_training_run_is_served_verified_with_its_worst_difference(digits_repo, start_server, caplog):
    caplog.set_level(logging.INFO)
    server = await start_server(digits_repo)
    address = f"127.0.0.1:{server.port}"

    info = await asyncio.to_thread(model_info, address)
    assert info.verified is True
    assert info.verification_provider == CPU == info.execution_provider
    assert info.HasField("verification_worst_difference")
    assert 0 <= info.verification_worst_difference <= info.verification_tolerance == pytest.approx(1e-4)

    parameters = await asyncio.to_thread(metadata_parameters, address, "digits")
    assert parameters["verified"] is True
    assert parameters["verification_provider"] == CPU
    assert parameters["verification_worst_difference"] == info.verification_worst_difference
    assert parameters["verification_tolerance"] == pytest.approx(1e-4)

    ready = [record.getMessage() for record in caplog.records if "ready on" in record.getMessage()]
    assert len(ready) == 1 and "digits v1" in ready[0]
    assert "verified: worst difference" in ready[0] and "on 8 golden inputs" in ready[0], ready[0]


def test_a_tampered_copy_is_refused_at_startup_with_one_error_line(tmp_path, tampered_digits):
    repository = tmp_path / "models"
    install_version(repository, "digits", 1, tampered_digits)
    server = ServerProcess(repository)
    with pytest.raises(ServerExited) as refused, server:
        pass
    assert server.process is not None and server.process.returncode == 1
    stderr = str(refused.value).split("before it was ready: ", 1)[1]
    errors = [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, stderr
    assert len([line for line in stderr.splitlines() if "fails verification" in line]) == 1, stderr
    line = errors[0]
    for part in ("model digits v1", CPU, "worst difference", "> tolerance 0.0001"):
        assert part in line, line
    worst = float(line.split("worst difference ")[1].split()[0])
    assert worst > 1e-4


async def test_a_tampered_version_arriving_by_hot_reload_is_refused_while_the_old_one_keeps_answering(
    digits_repo, tampered_digits, start_server, caplog
):
    server = await start_server(digits_repo, poll_interval_s=0.05)
    install_version(digits_repo, "digits", 2, tampered_digits)
    deadline = time.monotonic() + 60
    while "refused digits v2" not in caplog.text:
        assert time.monotonic() < deadline, "the tampered version was never looked at"
        await asyncio.sleep(0.05)

    refusals = [record for record in caplog.records if "digits v2" in record.getMessage()]
    assert len(refusals) == 1, [record.getMessage() for record in refusals]
    message = refusals[0].getMessage()
    assert refusals[0].levelname == "ERROR"
    for part in ("fails verification on " + CPU, "worst difference", "> tolerance 0.0001"):
        assert part in message, message

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="digits")
        request.inputs.add(name="image", datatype="FP32", shape=[1, 28, 28, 3])
        request.raw_input_contents.append(np.zeros((1, 28, 28, 3), "<f4").tobytes())
        response = await stub.ModelInfer(request)
        assert response.model_version == "1"
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
        assert list(metadata.versions) == ["1"]
        assert metadata.parameters["verified"].bool_param is True


def test_allow_unverified_serves_a_tampered_file_and_reports_it_unverified(tmp_path, tampered_digits):
    repository = tmp_path / "models"
    install_version(repository, "digits", 1, tampered_digits)
    with ServerProcess(repository, "--allow-unverified") as server:
        info = model_info(server.address)
        parameters = metadata_parameters(server.address, "digits")
    assert info.verified is False
    assert info.verification_provider == CPU
    assert info.verification_worst_difference > info.verification_tolerance == pytest.approx(1e-4)
    assert parameters["verified"] is False
    assert parameters["verification_worst_difference"] == info.verification_worst_difference


async def test_allow_unverified_logs_one_warning(tmp_path, start_server, caplog):
    caplog.set_level(logging.INFO)
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1, with_one_weight_changed(with_golden(tiny_model())))
    await start_server(repository, allow_unverified=True)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and "model tiny v1 fails verification" in warnings[0], warnings
    assert "serving it anyway" in warnings[0]
    assert any("UNVERIFIED: worst difference" in record.getMessage() for record in caplog.records)


async def test_a_file_without_golden_vectors_loads_and_is_reported_unverified(tiny_repo, start_server, caplog):
    caplog.set_level(logging.INFO)
    server = await start_server(tiny_repo)
    address = f"127.0.0.1:{server.port}"
    info = await asyncio.to_thread(model_info, address)
    assert info.verified is False
    assert info.verification_provider == ""
    assert not info.HasField("verification_worst_difference")
    assert not info.HasField("verification_tolerance")
    parameters = await asyncio.to_thread(metadata_parameters, address, "tiny")
    assert parameters["verified"] is False
    assert "verification_worst_difference" not in parameters
    assert any("tiny v1 ready on" in record.getMessage() and "unverified (no golden vectors)" in record.getMessage()
               for record in caplog.records)


async def test_a_tiny_model_with_golden_vectors_is_verified_and_a_tampered_one_refused(tmp_path, start_server):
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1, with_golden(tiny_model()))
    server = await start_server(repository)
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        info = await client.model_info()
    assert info.verified is True and info.verification_provider == CPU
    assert info.verification_worst_difference is not None and info.verification_worst_difference <= 1e-4
    assert info.card.golden is not None and info.card.golden.count == 8

    write_version(repository, "tiny", 1, with_one_weight_changed(with_golden(tiny_model())))
    with pytest.raises(StartupError, match=r"model tiny v1 fails verification on CPUExecutionProvider"):
        await start_server(repository)


# --- on a GPU -------------------------------------------------------------------------------------


def conv_model(size: int = 32, channels: int = 16, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """NHWC image → Conv 3x3 → Relu → MatMul → Softmax, with logits large enough that TF32 rounding shows."""
    rng = np.random.default_rng(seed)
    features = channels * (size - 2) ** 2
    kernel = rng.normal(size=(channels, 3, 3, 3)).astype(np.float32)
    weights = (rng.normal(size=(features, classes)) * 3 / np.sqrt(features)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["nchw", "kernel"], ["conv"]),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("Reshape", ["relu", "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializer=[
            numpy_helper.from_array(kernel, "kernel"),
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(np.array([-1, features], dtype=np.int64), "flat_shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = ModelCard(model_name="conv", model_version="1", labels=tuple(str(i) for i in range(classes)),
                     preprocessing=PreprocessingSpec(height=size, width=size))
    helper.set_model_props(model, card.to_metadata())
    return model


@pytest.mark.gpu
@pytest.mark.skipif(cuda_unusable() is not None, reason=str(cuda_unusable()))
def test_a_model_verified_on_the_cpu_verifies_on_cuda_with_tf32_off_and_would_fail_with_it_on(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(with_golden(conv_model()).SerializeToString())
    assert measure(OnnxModel.load(path, DeviceRequest("cpu"))).verified

    served = OnnxModel.load(path, DeviceRequest("cuda"))
    assert served.provider == CUDA
    on_cuda = measure(served)
    assert on_cuda.verified, on_cuda.summary()

    tf32_options = {**cuda_provider_options(0), "use_tf32": "1"}
    tf32_session = ort.InferenceSession(str(path), providers=[(CUDA, tf32_options)])
    assert tf32_session.get_providers()[0] == CUDA
    with_tf32 = measure(OnnxModel(path, tf32_session, served.card))
    assert not with_tf32.verified, with_tf32.summary()
    assert with_tf32.worst_difference is not None and with_tf32.worst_difference > with_tf32.tolerance
