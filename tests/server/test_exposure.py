"""A server reachable beyond loopback with neither a token nor TLS says so, once, in its log."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from convserve_bench.processes import free_port, wait_until_ready
from pydantic import SecretStr

from convserve_server.exposure import exposure_warning, is_loopback
from tests.conftest import server_config
from tests.models import write_version

WARNING_TEXT = "no --auth-token and no TLS"


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.7", False), ("server.example", False),
])
def test_loopback_addresses_are_told_apart_from_the_rest(host, loopback):
    assert is_loopback(host) is loopback


def test_only_an_exposed_server_without_token_or_tls_is_warned_about(tmp_path):
    exposed = server_config(tmp_path, host="0.0.0.0")
    assert WARNING_TEXT in exposure_warning(exposed, 8500) and "gRPC 0.0.0.0:8500" in exposure_warning(exposed, 8500)
    http_only = server_config(tmp_path, http_host="0.0.0.0")
    assert exposure_warning(http_only, 8500) is None  # HTTP closed
    assert "listening on HTTP 0.0.0.0:8000 with" in exposure_warning(http_only, 8500, 8000)
    assert exposure_warning(server_config(tmp_path, http_host="127.0.0.1"), 8500, 8000) is None
    assert exposure_warning(server_config(tmp_path), 8500) is None  # 127.0.0.1
    assert exposure_warning(server_config(tmp_path, host="0.0.0.0", auth_token=SecretStr("t")), 8500) is None
    cert = tmp_path / "cert.pem"
    with_tls = server_config(tmp_path, host="0.0.0.0", tls_cert=cert, tls_key=cert)
    assert exposure_warning(with_tls, 8500) is None


def serve_and_read_log(repository: Path, *flags: str) -> str:
    """Start ``convserve-serve`` with ``flags``, wait until it is ready (over loopback), stop it; its log."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "convserve_server", "--model-repository", str(repository), "--port", str(port),
             "--device", "cpu", "--poll-interval-s", "0", "--intra-op-threads", "1", *flags],
            stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_until_ready(f"127.0.0.1:{port}", process, 60, log)
        finally:
            process.terminate()
            process.wait(timeout=30)
        log.seek(0)
        return log.read().decode()


def test_a_server_on_every_interface_without_token_logs_one_warning_and_says_metrics_off(tmp_path):
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1)
    text = serve_and_read_log(repository, "--host", "0.0.0.0", "--metrics-port", "-1",
                              "--http-host", "0.0.0.0", "--http-port", "0")
    warnings = [line for line in text.splitlines() if WARNING_TEXT in line]
    assert len(warnings) == 1, text
    assert "WARNING" in warnings[0] and "listening on gRPC 0.0.0.0:" in warnings[0] and " and HTTP 0.0.0.0:" in warnings[0]
    listening = next(line for line in text.splitlines() if "listening on 0.0.0.0:" in line and "INFO" in line)
    assert listening.endswith("(metrics off)"), listening


def test_a_loopback_server_logs_no_warning_and_its_metrics_port(tmp_path):
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1)
    metrics_port = free_port()
    text = serve_and_read_log(repository, "--host", "127.0.0.1", "--metrics-host", "127.0.0.1",
                              "--metrics-port", str(metrics_port), "--http-host", "127.0.0.1", "--http-port", "0")
    assert WARNING_TEXT not in text
    assert f"(metrics port {metrics_port})" in text
