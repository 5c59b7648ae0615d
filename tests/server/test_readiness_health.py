"""The health service's readiness names follow ServerReady when the repository API empties a server and fills
it again, so that clients balancing over replicas with gRPC's health checking stop sending to an emptied one."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server.app import READINESS_NAMES
from tests.models import write_version

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAIT_S = 10.0

# What a replica-aware gRPC client asks for (convserve_client.targets builds the same): round robin over the
# replicas whose health service says "readiness" is SERVING.  Spelled out so that this test checks the server's
# side of that contract whatever the SDK chooses.
BALANCED_OPTIONS = [("grpc.service_config", json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": "readiness"},
})), ("grpc.service_config_disable_resolution", 1)]


def infer_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8, 3])
    request.raw_input_contents.append(np.zeros((1, 8, 8, 3), "<f4").tobytes())
    return request


async def statuses(channel: grpc.aio.Channel) -> dict[str, int]:
    health = health_pb2_grpc.HealthStub(channel)
    return {name: (await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
            for name in READINESS_NAMES}


async def wait_for_watch(channel: grpc.aio.Channel, status: int) -> None:
    """Return once a health Watch of "readiness" delivers ``status``: a balancing client's own Watch, opened
    earlier on the same server, has been sent the same update by then."""
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="readiness"),
                                                     timeout=WAIT_S)
    async for response in call:
        if response.status == status:
            call.cancel()
            return
    pytest.fail(f"readiness never became {status}")


async def test_unloading_the_only_model_turns_readiness_not_serving_and_loading_it_serving_again(tiny_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tiny_server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert set((await statuses(channel)).values()) == {SERVING}
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="tiny"), timeout=10)
        assert not (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
        await wait_for_watch(channel, NOT_SERVING)
        assert set((await statuses(channel)).values()) == {NOT_SERVING}
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"), timeout=30)
        assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
        await wait_for_watch(channel, SERVING)
        assert set((await statuses(channel)).values()) == {SERVING}
        assert len((await stub.ModelInfer(infer_request(), timeout=10)).outputs) == 1


async def test_shutdown_keeps_readiness_not_serving_even_if_a_model_is_loaded_meanwhile(tiny_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tiny_server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="tiny"), timeout=10)
        await wait_for_watch(channel, NOT_SERVING)
        draining = asyncio.get_running_loop().create_task(tiny_server.shutdown(grace_s=5, drain_delay_s=5))
        deadline = time.monotonic() + WAIT_S
        while not tiny_server.core.shutting_down:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await tiny_server.core.load_model("tiny")  # the core is loaded again, but the server is stopping
        assert set((await statuses(channel)).values()) == {NOT_SERVING}
        tiny_server.hurry()
        await draining


async def served_calls(stub: pb_grpc.GRPCInferenceServiceStub) -> int:
    stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny"), timeout=5)
    return sum(model.inference_stats.success.count for model in stats.model_stats)


async def test_a_client_balancing_over_two_replicas_sends_nothing_to_the_one_emptied(tmp_path: Path, start_server):
    replicas = []
    for name in ("a", "b"):
        write_version(tmp_path / name, "tiny", 1)
        replicas.append(await start_server(tmp_path / name))
    target = "ipv4:" + ",".join(f"127.0.0.1:{replica.port}" for replica in replicas)
    async with grpc.aio.insecure_channel(target, options=BALANCED_OPTIONS) as balanced, \
            grpc.aio.insecure_channel(f"127.0.0.1:{replicas[0].port}") as first, \
            grpc.aio.insecure_channel(f"127.0.0.1:{replicas[1].port}") as second:
        infer = pb_grpc.GRPCInferenceServiceStub(balanced).ModelInfer
        first_stub, second_stub = pb_grpc.GRPCInferenceServiceStub(first), pb_grpc.GRPCInferenceServiceStub(second)
        for _ in range(12):
            await infer(infer_request(), timeout=10, wait_for_ready=True)
        assert await served_calls(first_stub) > 0 and await served_calls(second_stub) > 0  # both were used

        await first_stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="tiny"), timeout=10)
        await wait_for_watch(first, NOT_SERVING)
        before = await served_calls(second_stub)
        for _ in range(12):  # each would be NOT_FOUND on the emptied replica
            assert len((await infer(infer_request(), timeout=10)).outputs) == 1
        assert await served_calls(second_stub) == before + 12

        await first_stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"), timeout=30)
        await wait_for_watch(first, SERVING)
        deadline = time.monotonic() + WAIT_S
        while await served_calls(first_stub) == 0:  # the refilled replica is sent calls again
            assert time.monotonic() < deadline, "the refilled replica was never sent a call"
            await infer(infer_request(), timeout=10)
