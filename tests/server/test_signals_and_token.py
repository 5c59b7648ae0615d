"""``convserve-serve`` as a real process: signals that must not end it undrained, and auth tokens no caller
could send, refused at startup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator

import grpc
import numpy as np
import pytest
from convserve_bench.processes import free_port, wait_until_ready

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.models import write_version

LOG_WAIT_S = 20.0


def _serve_command(repository: Path, port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "convserve_server", "--model-repository", str(repository), "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", "-1", "--device", "cpu", "--poll-interval-s", "0", *flags]


class _Server:
    """A server process whose log (stderr, in a file) the test can poll."""

    def __init__(self, repository: Path, *flags: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the fixture)
        self.process = subprocess.Popen(_serve_command(repository, self.port, *flags), stdout=subprocess.DEVNULL,
                                        stderr=self.log, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_for_log(self, fragment: str, times: int = 1) -> None:
        deadline = time.monotonic() + LOG_WAIT_S
        while self.text().count(fragment) < times:
            assert self.process.poll() is None, f"the server exited ({self.process.returncode}):\n{self.text()}"
            assert time.monotonic() < deadline, f"no {fragment!r} in the log:\n{self.text()}"
            time.sleep(0.05)


@pytest.fixture
def server_process(tiny_repo: Path, request: pytest.FixtureRequest) -> Iterator[_Server]:
    server = _Server(tiny_repo, *getattr(request, "param", ()))
    try:
        wait_until_ready(server.address, server.process, stderr_file=server.log)
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
        server.log.close()


def _infer_ok(stub: pb_grpc.GRPCInferenceServiceStub, version: str = "") -> None:
    request = pb.ModelInferRequest(model_name="tiny", model_version=version)
    request.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8, 3])
    request.raw_input_contents.append(np.zeros((1, 8, 8, 3), "<f4").tobytes())
    assert len(stub.ModelInfer(request, timeout=10).outputs) == 1


def test_usr1_usr2_and_alrm_are_ignored_hup_rescans_and_term_still_drains(server_process, tiny_repo):
    with grpc.insecure_channel(server_process.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
            server_process.process.send_signal(sig)
            server_process.wait_for_log(f"{sig.name} ignored")
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            _infer_ok(stub)
        write_version(tiny_repo, "tiny", 2)  # polling is off: only the SIGHUP rescan can find it
        server_process.process.send_signal(signal.SIGHUP)
        server_process.wait_for_log("SIGHUP rescan done")
        assert stub.ModelReady(pb.ModelReadyRequest(name="tiny", version="2"), timeout=10).ready
        _infer_ok(stub, "2")
    server_process.process.send_signal(signal.SIGTERM)
    assert server_process.process.wait(timeout=30) == 0
    log = server_process.text()
    assert "stop signal received" in log and "draining" in log and "stopped" in log, log


@pytest.mark.parametrize("server_process", [("--workers", "2")], indirect=True)
def test_with_workers_the_parent_ignores_the_same_signals_and_passes_sighup_on(server_process):
    server_process.wait_for_log("ready: serving tiny", times=2)
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
        server_process.process.send_signal(sig)
        server_process.wait_for_log(f"{sig.name} ignored")
    server_process.process.send_signal(signal.SIGHUP)
    server_process.wait_for_log("SIGHUP rescan done", times=2)  # each worker rescanned
    with grpc.insecure_channel(server_process.address) as channel:
        _infer_ok(pb_grpc.GRPCInferenceServiceStub(channel))
    server_process.process.send_signal(signal.SIGTERM)
    assert server_process.process.wait(timeout=30) == 0
    assert server_process.text().count("stopped") == 2, server_process.text()


def _start_with_token(repository: Path, token: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_serve_command(repository, 0), env={**os.environ, "CONVSERVE_AUTH_TOKEN": token},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("token, reason", [
    ("tok\n", "starts or ends with whitespace"),
    ("tok ", "starts or ends with whitespace"),
    ("t\x7fok", "U+007F at character 2"),
])
def test_a_token_no_caller_could_send_is_a_one_line_startup_error(tiny_repo, token, reason):
    result = _start_with_token(tiny_repo, token)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("convserve-serve: error: auth_token:"), \
        result.stderr
    assert reason in result.stderr and "tok" not in result.stderr.replace("token", ""), result.stderr
