"""Triton's classification extension on ModelInfer: a requested output's ``classification`` parameter asks for the
top classes as ``<value>:<index>:<label>`` strings (BYTES, shape [N, count]) instead of the probabilities."""

from __future__ import annotations

import grpc
import grpc.aio
import numpy as np
import pytest

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.models import TINY_LABELS
from tests.server.test_server import images, infer_request, reference


def classified(batch: np.ndarray, count: int | None, raw: bool = True, **parameter: object) -> pb.ModelInferRequest:
    """An inference request for ``batch`` that asks for its top ``count`` classes (or the given parameter)."""
    request = infer_request(batch, raw=raw)
    output = request.outputs.add(name="probabilities")
    if count is not None:
        output.parameters["classification"].int64_param = count
    for kind, value in parameter.items():
        setattr(output.parameters["classification"], kind, value)
    return request


def bytes_elements(raw: bytes) -> list[bytes]:
    """The elements of a raw BYTES tensor: each a 4-byte little-endian length, then its bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        length = int.from_bytes(raw[offset:offset + 4], "little")
        elements.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    return elements


def expected_classes(probabilities: np.ndarray, count: int) -> list[list[tuple[float, int, str]]]:
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :count]
    return [[(float(row[i]), int(i), TINY_LABELS[i]) for i in indices] for row, indices in zip(probabilities, order)]


def parsed(elements: list[bytes], count: int) -> list[list[tuple[float, int, str]]]:
    fields = [element.decode().split(":") for element in elements]
    rows = [(float(value), int(index), label) for value, index, label in fields]
    return [rows[start:start + count] for start in range(0, len(rows), count)]


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
async def test_the_top_classes_come_back_as_value_index_label_strings(tiny_repo, tiny_server, raw):
    batch = images(5, seed=3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tiny_server.port}") as channel:
        response = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(classified(batch, 3, raw=raw))
    [tensor] = response.outputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("probabilities", "BYTES", [5, 3])
    elements = bytes_elements(response.raw_output_contents[0]) if raw else list(tensor.contents.bytes_contents)
    assert len(elements) == 15
    assert all(element.decode().count(":") == 2 and "." in element.decode().split(":")[0] for element in elements)
    got = parsed(elements, 3)
    want = expected_classes(reference(tiny_repo / "tiny" / "1" / "model.onnx", batch), 3)
    for got_row, want_row in zip(got, want):
        assert [(index, label) for _, index, label in got_row] == [(index, label) for _, index, label in want_row]
        np.testing.assert_allclose([value for value, _, _ in got_row], [value for value, _, _ in want_row], atol=1e-6)


async def test_a_count_above_the_classes_gives_them_all_and_unsigned_counts_work(tiny_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tiny_server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = await stub.ModelInfer(classified(images(2), 99))
        assert list(response.outputs[0].shape) == [2, len(TINY_LABELS)]
        response = await stub.ModelInfer(classified(images(2), None, uint64_param=2))
        assert list(response.outputs[0].shape) == [2, 2]


@pytest.mark.parametrize("request_parameter, message", [
    ({"count": 0}, "at least 1, got 0"),
    ({"count": -4}, "at least 1, got -4"),
    ({"count": None, "string_param": "3"}, "must be an integer count, got string_param"),
    ({"count": None, "double_param": 3.0}, "must be an integer count, got double_param"),
], ids=["zero", "negative", "string", "double"])
async def test_a_classification_parameter_that_is_not_a_positive_count_is_invalid(tiny_server, request_parameter,
                                                                                  message):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tiny_server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(classified(images(1), **request_parameter))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


async def test_server_metadata_lists_the_classification_extension(tiny_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tiny_server.port}") as channel:
        metadata = await pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(pb.ServerMetadataRequest())
    assert "classification" in metadata.extensions
