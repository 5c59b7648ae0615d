"""Model lifecycle: new versions swap in without failing requests; bad ones are refused."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
import numpy as np

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.models import write_version


def request(version: str = "") -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="tiny", model_version=version)
    message.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8, 3])
    message.raw_input_contents.append(np.ones((1, 8, 8, 3), "<f4").tobytes())
    return message


async def versions(stub) -> list[str]:
    return list((await stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"))).versions)


async def test_new_version_is_swapped_in_while_requests_keep_succeeding(tiny_repo, start_server):
    server = await start_server(tiny_repo, poll_interval_s=0.1, versions_per_model=2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stop, swapped = asyncio.Event(), asyncio.Event()
        answered: list[str] = []
        asked_since_swap = [0] * 4  # per caller: answers to requests sent once both versions were listed

        async def keep_asking(caller: int) -> None:
            while not stop.is_set():
                sent_after_swap = swapped.is_set()
                answered.append((await stub.ModelInfer(request())).model_version)
                asked_since_swap[caller] += sent_after_swap

        load = [asyncio.ensure_future(keep_asking(caller)) for caller in range(4)]
        write_version(tiny_repo, "tiny", 2, seed=5)
        for _ in range(200):
            if await versions(stub) == ["1", "2"]:
                break
            await asyncio.sleep(0.05)
        swapped.set()
        deadline = time.monotonic() + 15
        while not all(asked_since_swap):  # then every call still in flight was sent after the swap
            assert time.monotonic() < deadline, f"callers stalled after the swap: {asked_since_swap}"
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*load)  # any failed request would raise here
        assert await versions(stub) == ["1", "2"]
        assert "1" in answered and answered[-1] == "2"
        assert (await stub.ModelInfer(request("1"))).model_version == "1"


async def test_corrupt_new_version_is_refused_and_the_old_one_keeps_serving(tiny_repo, start_server, caplog):
    server = await start_server(tiny_repo, poll_interval_s=0.1)
    broken = tiny_repo / "tiny" / "2" / "model.onnx"
    broken.parent.mkdir()
    broken.write_bytes(b"corrupt")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(100):
            if "refused tiny v2" in caplog.text:
                break
            await asyncio.sleep(0.05)
        assert "refused tiny v2" in caplog.text
        assert await versions(stub) == ["1"]
        assert (await stub.ModelInfer(request())).model_version == "1"
