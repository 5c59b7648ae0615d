"""A health Watch refused for its caps leaves replica-aware clients taking the replica as healthy.

Replica-aware SDK clients hold one health ``Watch`` per replica and connection (gRPC's client-side health
checking). Clients beyond the caps, from one host or in all, must still be answered at once: the refusal is
UNIMPLEMENTED, which gRPC's health checking reads as "no health service, assume healthy" (gRFC A17). Any other
code marks the replica unhealthy, and the call waits out its deadline.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from convserve_bench.processes import ServerProcess, free_port
from convserve_client import Client
from tests.models import write_version

HOSTS = ("127.0.0.2", "127.0.0.3")
CLIENTS = 4
IMAGE = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """Two replicas that admit one Watch stream per peer host, and one in all."""
    repository = tmp_path_factory.mktemp("models")
    write_version(repository, "tiny", 1)
    port = free_port()
    servers = [ServerProcess(repository, "--max-watch-streams", "1", "--max-watch-streams-per-peer", "1",
                             "--model-instances", "1", "--intra-op-threads", "1", "--log-level", "WARNING",
                             host=host, port=port) for host in HOSTS]
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(lambda server: server.__enter__(), servers))
    yield servers
    for server in servers:
        server.__exit__()


def test_clients_beyond_the_watch_caps_are_answered_at_once(replicas: list[ServerProcess]):
    addresses = ",".join(server.address for server in replicas)
    # Distinct channel options give each client connections of its own, so each holds Watch streams of its own.
    clients = [Client(addresses, timeout=10, channel_options=[("grpc.primary_user_agent", f"client-{index}")])
               for index in range(CLIENTS)]
    try:
        for round_ in range(2):  # the second round goes to the other replica, round-robin
            for index, client in enumerate(clients):
                started = time.monotonic()
                [result] = client.classify([IMAGE])
                seconds = time.monotonic() - started
                assert result.label, (index, round_)
                assert seconds < 5, f"client {index} waited {seconds:.1f} s: a refused Watch made a replica unhealthy"
    finally:
        for client in clients:
            client.close()
