"""A real ``convserve-serve`` process on a free port, for tests that need its memory, its exit or a crash-free run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from convserve_client.protos import grpc_predict_v2_pb2 as pb
from convserve_client.protos import grpc_predict_v2_pb2_grpc as pb_grpc


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_ready(address: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    """Block until the server at ``address`` says it is ready; fail if ``process`` exits first."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            if process.poll() is not None:
                errors = process.stderr.read().decode(errors="replace")[-2000:] if process.stderr else ""
                raise AssertionError(f"server exited ({process.returncode}) before it was ready: {errors}")
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.1)


class ServerProcess:
    """``python -m convserve_server`` on loopback; use as a context manager (waits until ready, then stops it)."""

    def __init__(self, repository: Path, *flags: str) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._args = [sys.executable, "-m", "convserve_server", "--model-repository", str(repository),
                      "--host", "127.0.0.1", "--port", str(self.port), "--metrics-host", "127.0.0.1",
                      "--metrics-port", str(self.metrics_port), "--device", "cpu", "--poll-interval-s", "0", *flags]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(self._args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.communicate()

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Block until ServerReady says so; fail if the process exits first."""
        assert self.process is not None
        wait_until_ready(self.address, self.process, timeout_s)

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process is not None and self.process.poll() is None

    def rss_mb(self) -> float:
        """Resident memory of the server process."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS line")

    def metric(self, name: str) -> float:
        """Sum of the samples called exactly ``name`` (with labels) on /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))
