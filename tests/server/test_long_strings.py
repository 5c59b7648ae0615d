"""Callers' strings of any length: a clear NOT_FOUND with a bounded message, never INTERNAL or a cut call."""

from __future__ import annotations

import grpc
import pytest

from convserve_client import AsyncClient, NotFoundError
from convserve_protocol.protos import classifier_pb2 as cpb
from convserve_protocol.protos import classifier_pb2_grpc as cpb_grpc
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.models import write_version

LONG_VERSION = "7" * 5000  # int() refuses strings of over 4300 digits
LONG_NAME = "m" * 200_000  # a message echoing it would not fit in HTTP/2 trailers
MAX_STATUS_MESSAGE = 1024


def calls(channel: grpc.aio.Channel, name: str, version: str):
    """Every method that names a model, as (method, awaitable)."""
    oip = pb_grpc.GRPCInferenceServiceStub(channel)
    typed = cpb_grpc.ClassifierStub(channel)
    infer_input = pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[1, 8, 8, 3])
    return [
        ("ModelMetadata", oip.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), timeout=10)),
        ("ModelInfer", oip.ModelInfer(pb.ModelInferRequest(
            model_name=name, model_version=version, inputs=[infer_input],
            raw_input_contents=[bytes(8 * 8 * 3 * 4)]), timeout=10)),
        ("Classify", typed.Classify(cpb.ClassifyRequest(
            model_name=name, model_version=version, images=bytes(8 * 8 * 3 * 4), shape=[1, 8, 8, 3]), timeout=10)),
        ("GetModelInfo", typed.GetModelInfo(cpb.GetModelInfoRequest(model_name=name, model_version=version),
                                            timeout=10)),
    ]


@pytest.mark.parametrize("name, version", [("tiny", LONG_VERSION), (LONG_NAME, ""), ("tiny", "١"), ("tiny", "²")])
async def test_every_method_answers_not_found_with_a_short_message(tiny_server, name, version):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tiny_server.port}",
                                         options=[("grpc.max_send_message_length", 1 << 20)]) as channel:
        for method, call in calls(channel, name, version):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND, (method, caught.value.code())
            assert len(caught.value.details()) <= MAX_STATUS_MESSAGE, method
        # ModelReady answers ready: false for any model it does not serve, as Triton does.
        oip = pb_grpc.GRPCInferenceServiceStub(channel)
        assert not (await oip.ModelReady(pb.ModelReadyRequest(name=name, version=version), timeout=10)).ready


async def test_the_sdk_reports_a_very_long_model_name_as_not_found(tiny_server):
    async with AsyncClient(f"127.0.0.1:{tiny_server.port}", model_name=LONG_NAME, timeout=10) as client:
        with pytest.raises(NotFoundError):
            await client.model_info()


async def test_odd_version_folders_are_ignored_at_startup(tmp_path, start_server):
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1)
    for odd in ("١", "²", "9" * 40):  # pass str.isdigit(); the last is past an int64
        write_version(repository, "tiny", 2).parent.rename(repository / "tiny" / odd)
    server = await start_server(repository)
    assert server.core.versions("tiny") == [1]
