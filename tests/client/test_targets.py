"""Server addresses: one as given, several replicas balanced round-robin over the ready ones."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from convserve_client import AsyncClient
from convserve_client.targets import channel_target
from convserve_client.cli import main as classify_main

IMAGE = np.zeros((8, 8, 3), dtype=np.uint8)


def test_one_address_is_used_as_given_with_grpcs_defaults():
    target = channel_target("localhost:8500", [("grpc.primary_user_agent", "me")])
    assert (target.target, target.options, target.replicas) == ("localhost:8500", (("grpc.primary_user_agent", "me"),),
                                                                 False)


def test_a_list_becomes_a_multi_address_target_with_round_robin_and_health_checking():
    target = channel_target(" 127.0.0.2:8500, 127.0.0.3:8501 ")
    assert target.target == "ipv4:127.0.0.2:8500,127.0.0.3:8501" and target.replicas
    options = dict(target.options)
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "readiness"}
    assert options["grpc.keepalive_time_ms"] == 1000 and options["grpc.http2.ping_timeout_ms"] == 1000
    assert channel_target("[::1]:8500,[::2]:8500").target == "ipv6:[::1]:8500,[::2]:8500"
    assert channel_target("localhost:8500,127.0.0.2:8500").target == "ipv4:127.0.0.1:8500,127.0.0.2:8500"


def test_dns_targets_name_replicas_and_the_callers_options_win():
    for address in ("dns:///convserve.default.svc:8500", "dns://10.0.0.10:53/convserve:8500"):
        target = channel_target(address, [("grpc.keepalive_time_ms", 5000)])
        assert target.target == address and target.replicas
        assert dict(target.options)["grpc.keepalive_time_ms"] == 5000
        assert dict(target.options)["grpc.dns_min_time_between_resolutions_ms"] == 1000


@pytest.mark.parametrize("address, message", [
    ("", "empty"),
    ("127.0.0.1:8500,", "empty entry"),
    ("127.0.0.1,127.0.0.2:8500", "not HOST:PORT"),
    ("127.0.0.1:99999,127.0.0.2:8500", "not HOST:PORT"),
    ("::1:8500,::2:8500", "in brackets"),
    ("127.0.0.1:8500,[::1]:8500", "mixes IPv4 and IPv6"),
])
def test_a_malformed_address_is_a_clear_error(address, message):
    with pytest.raises(ValueError, match=message):
        channel_target(address)


def classify_calls(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("convserve_requests_total{") and 'method="Classify"' in line)


async def test_calls_go_round_robin_and_never_to_a_replica_that_is_not_ready(tiny_repo, start_server):
    servers = [await start_server(tiny_repo) for _ in range(2)]
    address = ",".join(f"127.0.0.1:{server.port}" for server in servers)
    async with AsyncClient(address) as client:
        await client.wait_until_ready(10)
        for _ in range(20):
            await client.classify(IMAGE)
        counts = [await asyncio.to_thread(classify_calls, server) for server in servers]
        assert counts == [10, 10]
        await servers[0].health.set("readiness", health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + 5
        while True:  # the client learns it through its health watch, within milliseconds
            before = await asyncio.to_thread(classify_calls, servers[0])
            await asyncio.gather(*(client.classify(IMAGE) for _ in range(10)))
            if await asyncio.to_thread(classify_calls, servers[0]) == before:
                break
            assert time.monotonic() < deadline, "the replica that is not ready still gets calls"
        counts = [await asyncio.to_thread(classify_calls, server) for server in servers]
        for _ in range(20):
            await client.classify(IMAGE)
        assert [await asyncio.to_thread(classify_calls, server) for server in servers] == [counts[0], counts[1] + 20]


async def test_cli_spreads_a_long_list_of_images_over_a_list_of_servers(tiny_repo, start_server, tmp_path, capsys):
    servers = [await start_server(tiny_repo, max_batch_size=2) for _ in range(2)]
    paths = []
    for i in range(8):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(np.full((8, 8, 3), i * 30, dtype=np.uint8)).save(paths[-1])
    address = ",".join(f"127.0.0.1:{server.port}" for server in servers)
    code = await asyncio.to_thread(classify_main, [*paths, "--server", address])
    header, *lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and header == "# model tiny version 1" and len(lines) == 8
    assert all([await asyncio.to_thread(classify_calls, server) > 0 for server in servers])


def test_cli_with_a_malformed_server_list_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "x.png"
    Image.fromarray(IMAGE).save(path)
    assert classify_main([str(path), "--server", "127.0.0.1:1,"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convserve-classify: error:") and "empty entry" in err[0]
