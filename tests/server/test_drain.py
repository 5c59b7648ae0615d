"""Health names a kubelet probes, the drain delay on shutdown, and the connection settings for replicas."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve_protocol.protos import classifier_pb2 as cpb
from convserve_protocol.protos import classifier_pb2_grpc as cpb_grpc
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server.config import load_config

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DRAIN_DELAY_S = 3.0


def classify_request() -> cpb.ClassifyRequest:
    batch = np.zeros((1, 8, 8, 3), dtype="<f4")
    return cpb.ClassifyRequest(images=batch.tobytes(), shape=list(batch.shape))


async def status(channel: grpc.aio.Channel, service: str) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return response.status


async def test_liveness_is_serving_from_the_start_and_readiness_once_warm(tiny_repo, start_server):
    server = await start_server(tiny_repo, warm=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert await status(channel, "liveness") == SERVING
        assert await status(channel, "readiness") == NOT_SERVING
        await server.warm_up()
        for service in ("liveness", "readiness", "", "convserve.v1.Classifier", "inference.GRPCInferenceService"):
            assert await status(channel, service) == SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await status(channel, "nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_during_the_drain_delay_readiness_is_off_and_calls_are_still_answered(tiny_repo, start_server):
    server = await start_server(tiny_repo, drain_delay_s=DRAIN_DELAY_S)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        classifier = cpb_grpc.ClassifierStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="readiness"))
        assert (await watch.read()).status == SERVING
        started = time.monotonic()
        stopping = asyncio.ensure_future(server.shutdown(grace_s=5))
        assert (await watch.read()).status == NOT_SERVING
        assert len((await classifier.Classify(classify_request(), timeout=5)).results) == 1
        assert time.monotonic() - started < DRAIN_DELAY_S, "the answer must come within the delay to prove anything"
        assert await status(channel, "liveness") == SERVING
        assert await status(channel, "") == NOT_SERVING
        while not server.core.draining:
            assert time.monotonic() - started < DRAIN_DELAY_S + 5, "the drain never began"
            await asyncio.sleep(0.02)
        # From here the core refuses new requests as UNAVAILABLE (test_server.py shows how); asking here
        # would race the stop that follows at once when no accepted request is left.
        assert time.monotonic() - started >= DRAIN_DELAY_S
        await stopping
    assert server.stopped


async def readiness_everywhere(channel: grpc.aio.Channel) -> dict[str, bool]:
    """What ServerReady, ModelReady (without and with a version), the repository index and health say."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
    return {
        "ServerReady": (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready,
        "ModelReady": (await stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=5)).ready,
        "ModelReady v1": (await stub.ModelReady(pb.ModelReadyRequest(name="tiny", version="1"), timeout=5)).ready,
        "RepositoryIndex": all(model.state == "READY" for model in index.models),
        "health": await status(channel, "readiness") == SERVING,
    }


async def test_during_the_drain_delay_server_ready_model_ready_and_health_agree(tiny_repo, start_server):
    server = await start_server(tiny_repo, drain_delay_s=DRAIN_DELAY_S)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert set((await readiness_everywhere(channel)).values()) == {True}
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="readiness"))
        assert (await watch.read()).status == SERVING
        started = time.monotonic()
        stopping = asyncio.ensure_future(server.shutdown(grace_s=5))
        assert (await watch.read()).status == NOT_SERVING
        assert await readiness_everywhere(channel) == dict.fromkeys(
            ("ServerReady", "ModelReady", "ModelReady v1", "RepositoryIndex", "health"), False)
        assert len((await cpb_grpc.ClassifierStub(channel).Classify(classify_request(), timeout=5)).results) == 1
        assert time.monotonic() - started < DRAIN_DELAY_S, "the answers must come within the delay to prove anything"
        server.hurry()
        await asyncio.wait_for(stopping, 10)


async def test_hurry_ends_the_drain_delay(tiny_repo, start_server):
    server = await start_server(tiny_repo, drain_delay_s=60)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stopping = asyncio.ensure_future(server.shutdown(grace_s=5))
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="readiness"))
        while (await watch.read()).status != NOT_SERVING:
            pass
        assert not server.core.draining
        server.hurry()
        await asyncio.wait_for(stopping, 10)
    assert server.stopped


def test_drain_and_connection_settings_come_from_flags():
    config = load_config(["--drain-delay-s", "5", "--max-connection-age-s", "30", "--max-connection-age-grace-s", "2"])
    assert (config.drain_delay_s, config.max_connection_age_s, config.max_connection_age_grace_s) == (5, 30, 2)
    defaults = load_config([])
    assert (defaults.drain_delay_s, defaults.max_connection_age_s, defaults.max_connection_age_grace_s) == (0, 0, 5)
    with pytest.raises(ValueError, match="drain_delay_s"):
        load_config(["--drain-delay-s", "-1"])
