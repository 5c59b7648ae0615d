"""The /metrics endpoint: process_* metrics, and idle or half-sent connections cost neither threads nor scrapes."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from convserve_server.metrics import ServerMetrics

ATTACKERS = 500


def scrape(port: int, path: str = "/metrics", timeout: float = 5.0) -> str:
    """One scrape, as Prometheus makes it."""
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout).read().decode()


@pytest.fixture
def endpoint():
    metrics = ServerMetrics(max_batch_size=8)
    port = metrics.serve_http("127.0.0.1", 0)
    yield metrics, port
    metrics.close()


def test_process_metrics_are_exported(endpoint) -> None:
    _, port = endpoint
    text = scrape(port)
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
    assert "convserve_requests_total" in text or "# HELP convserve_" in text


def test_unknown_paths_and_methods_get_http_errors(endpoint) -> None:
    _, port = endpoint
    with pytest.raises(urllib.error.HTTPError) as caught:
        scrape(port, "/secrets")
    assert caught.value.code == 404
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 405


def test_half_sent_requests_start_no_threads_and_scrapes_still_answer(endpoint) -> None:
    _, port = endpoint
    threads_before = threading.active_count()
    attackers = []
    try:
        for _ in range(ATTACKERS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metr")  # a request head that never ends
            attackers.append(sock)
        started = time.monotonic()
        text = scrape(port, timeout=5)
        assert "process_resident_memory_bytes" in text
        assert time.monotonic() - started < 2.5  # well under the 5 s a half-sent connection is given
        assert threading.active_count() <= threads_before + 1
    finally:
        for sock in attackers:
            sock.close()


def test_a_silent_connection_is_closed_after_the_deadline(endpoint) -> None:
    metrics, port = endpoint
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # the server closed it
        elapsed = time.monotonic() - started
    assert 3 < elapsed < 9  # the 5 s deadline, with slack for a loaded machine


async def test_a_real_server_serves_its_metrics_through_the_bounded_endpoint(tiny_server) -> None:
    text = await asyncio.to_thread(scrape, tiny_server.metrics_port)
    assert "process_resident_memory_bytes" in text
