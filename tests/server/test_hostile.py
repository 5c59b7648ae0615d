"""Hostile input against a real server process: fuzzed requests, garbage bytes, oversized messages.

Every bad request must get INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED with a
message, the process must stay up, and callers sending good requests at the same
time must all get correct answers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from convserve_bench.processes import ServerProcess
from convserve_protocol.protos import classifier_pb2 as cpb
from convserve_protocol.protos import classifier_pb2_grpc as cpb_grpc
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.callers import SHAPE, GoodCallers, infer_request
from tests.models import write_version

CLEAR_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
MAX_MESSAGE_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_version(tmp_path_factory.mktemp("hostile") / "models", "tiny", 1)


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[ServerProcess]:
    repository = model_path.parents[2]
    with ServerProcess(repository, "--max-message-bytes", str(MAX_MESSAGE_BYTES)) as process:
        yield process


# --- strategies: requests valid except in up to three chosen ways ----------------------------------

INFER_FAULTS = ("name", "version", "input_count", "input_name", "datatype", "shape", "payload", "nonfinite",
                "both_forms", "output")
CLASSIFY_FAULTS = ("name", "version", "shape", "payload", "nonfinite", "top_k")

dims = st.one_of(st.integers(-3, 4), st.sampled_from([8, 3, 2**31 - 1, 2**40, -(2**40)]))
bad_shapes = st.one_of(
    st.lists(dims, max_size=6),
    st.builds(lambda n, tail: [n, *tail], st.integers(-1, 3), st.sampled_from([[8, 8], [3, 8, 8], [8, 8, 1], [8, 8, 3, 1]])),
)
bad_names = st.one_of(st.sampled_from(["nope", "../tiny", "tiny\x00", "TINY"]), st.text(min_size=1, max_size=12))
bad_versions = st.one_of(st.sampled_from(["2", "0", "-1", "1.0", "\u0661", "99999999999999999999"]), st.text(min_size=1, max_size=6))


@st.composite
def images_for(draw: st.DrawFn, faults: set[str]) -> tuple[list[int], bytes]:
    """A shape and its little-endian FP32 bytes, broken as ``faults`` says."""
    shape = draw(bad_shapes) if "shape" in faults else [draw(st.integers(1, 3)), *SHAPE]
    count = int(np.prod(shape)) if shape and all(0 < d <= 4096 for d in shape) else 0
    values = np.random.default_rng(draw(st.integers(0, 2**16))).random(min(count, 4096), dtype=np.float32)
    if "nonfinite" in faults and values.size:
        values[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    data = values.astype("<f4").tobytes()
    if "payload" in faults:
        data = draw(st.one_of(st.binary(max_size=4096), st.just(data[: -draw(st.integers(1, 8))] if data else b"x"),
                              st.just(data + b"\0\0\0\0")))
    return shape, data


@st.composite
def model_infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    faults = draw(st.sets(st.sampled_from(INFER_FAULTS), max_size=3))
    request = pb.ModelInferRequest(
        model_name=draw(bad_names) if "name" in faults else draw(st.sampled_from(["tiny", ""])),
        model_version=draw(bad_versions) if "version" in faults else draw(st.sampled_from(["", "1", "01"])),
        id=draw(st.text(max_size=8)),
    )
    typed = draw(st.booleans())
    inputs = draw(st.sampled_from([0, 2, 3])) if "input_count" in faults else 1
    for _ in range(inputs):
        shape, data = draw(images_for(faults))
        tensor = request.inputs.add(
            name=draw(st.text(max_size=8).filter(lambda n: n != "image")) if "input_name" in faults else "image",
            datatype=draw(st.sampled_from(["INT32", "FP64", "BYTES", "", "fp32"])) if "datatype" in faults else "FP32",
            shape=shape,
        )
        if typed:
            tensor.contents.fp32_contents.extend(np.frombuffer(data[: len(data) // 4 * 4], "<f4").tolist())
        if not typed or "both_forms" in faults:
            request.raw_input_contents.append(data)
    if "output" in faults:
        request.outputs.add(name=draw(st.text(max_size=8).filter(lambda n: n != "probabilities")))
    elif draw(st.booleans()):
        request.outputs.add(name="probabilities")
    return request


@st.composite
def classify_requests(draw: st.DrawFn) -> cpb.ClassifyRequest:
    faults = draw(st.sets(st.sampled_from(CLASSIFY_FAULTS), max_size=3))
    shape, data = draw(images_for(faults))
    return cpb.ClassifyRequest(
        model_name=draw(bad_names) if "name" in faults else draw(st.sampled_from(["tiny", ""])),
        model_version=draw(bad_versions) if "version" in faults else draw(st.sampled_from(["", "1"])),
        shape=shape, images=data,
        top_k=draw(st.one_of(st.integers(-(2**31), -1), st.integers(5, 2**31 - 1))) if "top_k" in faults
        else draw(st.integers(0, 4)),
        include_probabilities=draw(st.booleans()),
    )


def names_the_model(request) -> bool:
    name = request.model_name
    version = request.model_version
    return name in ("", "tiny") and (version == "" or (version.isascii() and version.isdigit() and int(version) == 1))


def valid_images(shape, values: np.ndarray | None) -> bool:
    """The shape and byte count the model takes; any values (ModelInfer is a tensor API, as Triton's is)."""
    return (len(shape) == 4 and shape[0] >= 1 and list(shape[1:]) == list(SHAPE) and values is not None
            and values.size == int(np.prod(shape)))


def as_floats(data: bytes) -> np.ndarray | None:
    return np.frombuffer(data, "<f4") if len(data) % 4 == 0 else None


def infer_is_valid(request: pb.ModelInferRequest) -> bool:
    """The oracle: what the Open Inference Protocol and the model's signature allow."""
    if not names_the_model(request) or len(request.inputs) != 1:
        return False
    tensor = request.inputs[0]
    if tensor.name != "image" or tensor.datatype != "FP32" or any(o.name != "probabilities" for o in request.outputs):
        return False
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1 or tensor.HasField("contents"):
            return False
        values = as_floats(request.raw_input_contents[0])
    else:
        values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
    return valid_images(tensor.shape, values)


def classify_is_valid(request: cpb.ClassifyRequest) -> bool:
    """The oracle for Classify."""
    values = as_floats(request.images)
    return (names_the_model(request) and 0 <= request.top_k <= 4
            and valid_images(request.shape, values) and bool(np.isfinite(values).all()))


def check_answer(call, request, valid: bool) -> None:
    """A valid request gets a well-formed answer; any other a clear error with a message."""
    try:
        response = call(request, timeout=10)
    except grpc.RpcError as exc:
        assert not valid, f"valid request refused: {exc.code()} {exc.details()}"
        assert exc.code() in CLEAR_ERRORS, (exc.code(), exc.details(), request)
        assert exc.details(), "an error needs a message"
        return
    assert valid, f"invalid request answered: {request}"
    if isinstance(response, pb.ModelInferResponse):
        assert list(response.outputs[0].shape) == [request.inputs[0].shape[0], 4]
    else:
        assert len(response.results) == request.shape[0]
        assert all(len(r.top_k) == max(request.top_k, 1) for r in response.results)


FUZZ = settings(max_examples=int(os.environ.get("CONVSERVE_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_fuzzed_requests_get_clear_errors_while_good_callers_succeed(server: ServerProcess, model_path: Path):
    with grpc.insecure_channel(server.address) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        classify = cpb_grpc.ClassifierStub(channel).Classify

        @FUZZ
        @given(model_infer_requests())
        def fuzz_model_infer(request: pb.ModelInferRequest) -> None:
            check_answer(infer, request, infer_is_valid(request))

        @FUZZ
        @given(classify_requests())
        def fuzz_classify(request: cpb.ClassifyRequest) -> None:
            check_answer(classify, request, classify_is_valid(request))

        with GoodCallers(server.address, model_path) as good:
            fuzz_model_infer()
            fuzz_classify()
    assert good.failures == []
    assert good.answered > 0
    assert server.alive


@pytest.mark.parametrize("method", ["/inference.GRPCInferenceService/ModelInfer", "/convserve.v1.Classifier/Classify"])
def test_bytes_that_are_not_protobuf_are_invalid_argument(server: ServerProcess, method: str):
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(method)  # no serializer: the bytes go on the wire as they are
        for garbage in (b"\xff\xfe\xfd not protobuf", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" * 7):
            with pytest.raises(grpc.RpcError) as caught:
                call(garbage, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a valid" in caught.value.details()
        assert len(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(np.zeros((1, *SHAPE), "f4"))).outputs) == 1


def test_garbage_on_the_socket_does_not_disturb_the_server(server: ServerProcess, model_path: Path):
    rng = np.random.default_rng(7)
    with GoodCallers(server.address, model_path, threads=1) as good:
        for opening in (b"", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"):
            for _ in range(5):
                with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                    sock.sendall(opening + rng.bytes(int(rng.integers(1, 65536))))
                    sock.settimeout(0.5)
                    try:
                        sock.recv(1024)  # whatever the server says before closing; it must not hang us
                    except (TimeoutError, ConnectionError):
                        pass
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass  # a connection opened and dropped without a byte
    assert good.failures == [] and good.answered > 0
    assert server.alive


def test_oversized_messages_are_refused_with_resource_exhausted(server: ServerProcess):
    images = np.zeros((400, *SHAPE), dtype=np.float32)  # 307 KB > the 256 KiB limit
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(images), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            cpb_grpc.ClassifierStub(channel).Classify(
                cpb.ClassifyRequest(images=images.tobytes(), shape=images.shape), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(images[:100]), timeout=10)
        assert answer.outputs[0].shape == [100, 4]
