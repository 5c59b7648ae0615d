"""Replicas as real processes behind one client: no call is lost when one dies, freezes, drains or is replaced.

Three or four ``python -m convserve_server`` processes listen on 127.0.0.2, 127.0.0.3, ... on one port, like
pods behind a Kubernetes headless Service.  Clients reach them through an address list, or through a
``dns://127.0.0.1:PORT/replicas.test:PORT`` target that :class:`tests.dns.DnsResponder` answers (gRPC's
c-ares resolver asks the DNS server the target names).  Each case runs a closed loop of ``CALLERS``
callers with the SDK's default retry policy, records every call's outcome, injects its fault and asserts
that no call was lost: every one answered, after retries within its deadline where it had to be.
``pytest -s`` prints each case's worst added latency; the ``soak`` variants keep the load on for longer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import numpy as np
import pytest

from convserve_client import AsyncClient, Client
from tests.dns import DnsResponder
from tests.models import write_version
from convserve_bench.processes import ServerProcess, free_port

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
NAME = "replicas.test"
CALLERS = 8
CALL_TIMEOUT_S = 10.0
LOAD_S = 3.0
"""Seconds of load after each fault."""
SOAK_LOAD_S = 20.0
MAX_AGE_S = 2.0
DRAIN_DELAY_S = 1.0
GRACE_S = 5.0
SERVER_FLAGS = ("--intra-op-threads", "1", "--model-instances", "1", "--grace-period-s", str(GRACE_S),
                "--log-level", "WARNING")
MAX_AGE = ("--max-connection-age-s", str(MAX_AGE_S))
DRAIN = ("--drain-delay-s", str(DRAIN_DELAY_S))
IMAGE = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
ANSWERED = 'convserve_requests_total{code="OK",method="Classify",model="tiny"}'
WARM_CALLS = 40
"""Calls answered before a fault is injected."""


@pytest.fixture(scope="module")
def repositories(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """A repository of tiny v1 and one of tiny v2 (the rolled-out version)."""
    repositories = {}
    for version in (1, 2):
        repositories[version] = tmp_path_factory.mktemp(f"v{version}")
        write_version(repositories[version], "tiny", version, seed=version)
    return repositories


@pytest.fixture(params=[LOAD_S, pytest.param(SOAK_LOAD_S, marks=pytest.mark.soak)], ids=["quick", "soak"])
def load_s(request: pytest.FixtureRequest) -> float:
    """How long the load runs after a fault."""
    return float(request.param)


class Replicas:
    """Server processes on loopback addresses sharing one port; all stopped at the end of the test."""

    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self.port = free_port()
        self.servers: list[ServerProcess] = []

    def start(self, hosts: tuple[str, ...], *flags: str, repository: Path | None = None) -> list[ServerProcess]:
        """Start one replica per host, in parallel; returns once every one is ready."""
        servers = [ServerProcess(repository or self.repository, *SERVER_FLAGS, *flags, host=host, port=self.port)
                   for host in hosts]
        with ThreadPoolExecutor(len(servers)) as pool:
            started = [pool.submit(server.__enter__) for server in servers]
        self.servers += [server for server, future in zip(servers, started) if future.exception() is None]
        for future in started:
            future.result()
        return servers

    def close(self) -> None:
        """SIGTERM every replica still running (and wake a frozen one), then wait for each."""
        for server in self.servers:
            if server.alive:
                server.process.send_signal(signal.SIGCONT)
                server.process.terminate()
        for server in self.servers:
            server.__exit__()


@pytest.fixture
def replicas(repositories: dict[int, Path]) -> Iterator[Replicas]:
    """Replicas serving tiny v1 unless told otherwise."""
    cluster = Replicas(repositories[1])
    yield cluster
    cluster.close()


@pytest.fixture
def dns() -> Iterator[DnsResponder]:
    """The DNS responder for ``replicas.test``, serving no address until a test sets some."""
    assert os.environ.get("GRPC_DNS_RESOLVER", "ares") == "ares", \
        "GRPC_DNS_RESOLVER=native ignores the DNS server named in a dns:// target; these tests need c-ares"
    with DnsResponder(NAME) as responder:
        yield responder


def address_list(servers: list[ServerProcess]) -> str:
    """``host:port,host:port`` of the servers."""
    return ",".join(server.address for server in servers)


@dataclass(frozen=True)
class Outcome:
    """One call: when it started, how long it took, and its error if it failed."""

    started: float
    seconds: float
    error: BaseException | None


class Load:
    """``CALLERS`` closed-loop callers of ``call`` (an async callable) that keep every call's outcome."""

    def __init__(self, call: Callable[[], Awaitable[Any]]) -> None:
        self.outcomes: list[Outcome] = []
        self._call = call
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.ensure_future(self._caller()) for _ in range(CALLERS)]
        await self.wait_until(lambda: self.answered() >= WARM_CALLS, 30, f"{WARM_CALLS} calls answered")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _caller(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            error: BaseException | None = None
            try:
                await self._call()
            except Exception as exc:  # every failure is an outcome to report, not a crash of the caller
                error = exc
            self.outcomes.append(Outcome(started, time.monotonic() - started, error))

    def answered(self, since: float = 0.0) -> int:
        """Calls answered that started at or after ``since``."""
        return sum(1 for o in self.outcomes if o.error is None and o.started >= since)

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Poll ``condition`` under load; the seconds it took, or a failure after ``timeout_s``."""
        started = time.monotonic()
        while not condition():
            assert time.monotonic() - started < timeout_s, f"not {what} within {timeout_s:g} s"
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    async def run_for(self, seconds: float) -> None:
        """Keep the load on for ``seconds`` (a fixed span of load: nothing to poll for)."""
        await asyncio.sleep(seconds)


def sync_caller(client: Client, pool: ThreadPoolExecutor) -> Callable[[], Awaitable[Any]]:
    """Calls of the blocking client, each on a thread of ``pool``."""
    loop = asyncio.get_running_loop()
    return lambda: loop.run_in_executor(pool, client.classify, IMAGE)


def assert_nothing_lost(case: str, load: Load, fault_at: float) -> None:
    """Every call answered, and enough of them after the fault; prints the worst added latency."""
    lost = [o for o in load.outcomes if o.error is not None]
    before = [o.seconds for o in load.outcomes if o.error is None and o.started + o.seconds < fault_at]
    baseline = statistics.median(before)
    worst = max(o.seconds for o in load.outcomes if o.started + o.seconds >= fault_at)
    print(f"\n{case}: {len(load.outcomes)} calls, {len(lost)} lost, {load.answered(fault_at)} answered after the "
          f"fault; median before it {baseline * 1000:.1f} ms, worst added latency {(worst - baseline) * 1000:.0f} ms")
    assert not lost, f"{case}: {len(lost)} of {len(load.outcomes)} calls lost, e.g. {lost[0].error!r}"
    assert load.answered(fault_at) >= WARM_CALLS, f"{case}: the load stalled after the fault"


async def answered_by(server: ServerProcess) -> float:
    """Classify calls the replica answered, from its own /metrics."""
    return await asyncio.to_thread(server.metric, ANSWERED)


async def test_a_killed_replica_loses_no_call(replicas: Replicas, load_s: float) -> None:
    servers = replicas.start(HOSTS[:3], *MAX_AGE)
    with Client(address_list(servers), timeout=CALL_TIMEOUT_S) as client, ThreadPoolExecutor(CALLERS) as pool:
        async with Load(sync_caller(client, pool)) as load:
            assert await answered_by(servers[0]) > 0, "the victim was not in the rotation"
            fault_at = time.monotonic()
            servers[0].process.kill()
            await load.run_for(load_s)
    assert servers[0].process.wait() == -signal.SIGKILL
    assert_nothing_lost("SIGKILL, list target, blocking client", load, fault_at)


async def test_a_frozen_replica_loses_no_call_and_is_found_out_by_keepalive(replicas: Replicas, load_s: float) -> None:
    servers = replicas.start(HOSTS[:3], *MAX_AGE)
    async with AsyncClient(address_list(servers), timeout=CALL_TIMEOUT_S) as client:
        async with Load(lambda: client.classify(IMAGE)) as load:
            assert await answered_by(servers[0]) > 0, "the victim was not in the rotation"
            fault_at = time.monotonic()
            servers[0].process.send_signal(signal.SIGSTOP)
            try:
                await load.run_for(load_s)
            finally:
                servers[0].process.kill()
    assert_nothing_lost("SIGSTOP, list target, asyncio client", load, fault_at)
    worst = max(o.seconds for o in load.outcomes)
    assert worst < CALL_TIMEOUT_S / 2, f"a call to the frozen replica took {worst:.1f} s: keepalive did not find it"


async def test_a_draining_replica_loses_no_call(replicas: Replicas, dns: DnsResponder, load_s: float) -> None:
    servers = replicas.start(HOSTS[:3], *MAX_AGE, *DRAIN)
    dns.addresses = [server.host for server in servers]
    async with AsyncClient(dns.target(replicas.port), timeout=CALL_TIMEOUT_S) as client:
        async with Load(lambda: client.classify(IMAGE)) as load:
            assert await answered_by(servers[0]) > 0, "the victim was not in the rotation"
            fault_at = time.monotonic()
            dns.addresses = [server.host for server in servers[1:]]
            servers[0].process.terminate()
            await load.run_for(load_s)
    assert await asyncio.to_thread(servers[0].process.wait, DRAIN_DELAY_S + GRACE_S + 10) == 0
    assert_nothing_lost("SIGTERM with a drain delay, dns target", load, fault_at)


async def added_replica_case(replicas: Replicas, dns: DnsResponder,
                             *flags: str) -> tuple[Load, float, list[tuple[float, float]], float]:
    """Two replicas in DNS under load, then a third added: when; the third's Classify count, with the seconds
    since, until it reaches ``2 * WARM_CALLS`` or ``MAX_AGE_S`` + 4 s pass; and its share of the next second."""
    servers = replicas.start(HOSTS[:3], *flags)
    dns.addresses = [server.host for server in servers[:2]]
    counts: list[tuple[float, float]] = []
    async with AsyncClient(dns.target(replicas.port), timeout=CALL_TIMEOUT_S) as client:
        async with Load(lambda: client.classify(IMAGE)) as load:
            added_at = time.monotonic()
            dns.addresses = [server.host for server in servers]
            while time.monotonic() - added_at < MAX_AGE_S * 1.2 + 4 and (not counts or counts[-1][1] < 2 * WARM_CALLS):
                counts.append((time.monotonic() - added_at, await answered_by(servers[2])))
                await asyncio.sleep(0.1)
            share = await added_share(servers) if counts[-1][1] > 0 else 0.0
    return load, added_at, counts, share


async def added_share(servers: list[ServerProcess]) -> float:
    """The third replica's share of the calls the three answer in the next second."""
    before = [await answered_by(server) for server in servers]
    await asyncio.sleep(1.0)
    after = [await answered_by(server) for server in servers]
    gained = [a - b for a, b in zip(after, before)]
    return gained[2] / max(1.0, sum(gained))


async def test_a_replica_added_to_dns_gets_a_share_within_the_max_connection_age(
        replicas: Replicas, dns: DnsResponder) -> None:
    load, added_at, counts, share = await added_replica_case(replicas, dns, *MAX_AGE)
    assert counts[-1][1] > 0, f"the added replica got no call within {MAX_AGE_S * 1.2 + 4:g} s"
    reached_after = next(seconds for seconds, count in counts if count > 0)
    print(f"\nadded replica: first call after about {reached_after:.1f} s; {share:.0%} of the next second's calls "
          f"(max connection age {MAX_AGE_S:g} s)")
    assert share >= 0.15, f"the added replica answered only {share:.0%} of the calls"
    assert_nothing_lost("replica added to DNS", load, added_at)


async def test_without_a_max_connection_age_an_added_replica_gets_nothing(
        replicas: Replicas, dns: DnsResponder) -> None:
    load, _, counts, _ = await added_replica_case(replicas, dns)
    print(f"\nno max connection age: the added replica answered {counts[-1][1]:g} calls in {counts[-1][0]:.1f} s "
          f"after it was added; the other two answered {load.answered()}")
    assert load.answered() > 2 * WARM_CALLS
    assert counts[-1][1] == 0, "the added replica was reached without connections being aged out"


async def test_a_rollout_to_a_new_version_loses_no_call(
        replicas: Replicas, dns: DnsResponder, repositories: dict[int, Path], load_s: float) -> None:
    old = replicas.start(HOSTS[:2], *MAX_AGE, *DRAIN)
    dns.addresses = [server.host for server in old]
    async with AsyncClient(dns.target(replicas.port), timeout=CALL_TIMEOUT_S) as client:
        async with Load(lambda: client.classify(IMAGE)) as load:
            fault_at = time.monotonic()
            new = await asyncio.to_thread(replicas.start, HOSTS[2:4], *MAX_AGE, *DRAIN, repository=repositories[2])
            dns.addresses = [server.host for server in new]
            for server in old:
                server.process.terminate()
            await load.run_for(load_s)
        assert (await client.model_info(refresh=True)).version == "2"
    assert [await asyncio.to_thread(server.process.wait, DRAIN_DELAY_S + GRACE_S + 10) for server in old] == [0, 0]
    assert all([await answered_by(server) > 0 for server in new]), "a new replica got no call"
    assert_nothing_lost("rollout: new replicas, DNS moved, old ones SIGTERMed", load, fault_at)
