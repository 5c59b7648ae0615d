"""A real ``convserve-serve`` process on a free port, for tests that need its memory, its exit or a crash-free run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO

import grpc

from convserve_client.protos import grpc_predict_v2_pb2 as pb
from convserve_client.protos import grpc_predict_v2_pb2_grpc as pb_grpc


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerExited(AssertionError):
    """The server process exited before it was ready; the message ends with its stderr."""


def wait_until_ready(address: str, process: subprocess.Popen, timeout_s: float = 60,
                     stderr_file: IO[bytes] | None = None) -> None:
    """Block until the server at ``address`` says it is ready; :class:`ServerExited` if ``process`` exits first.

    The error ends with what the process wrote to stderr: its pipe, or ``stderr_file`` if it wrote there.
    """
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            if process.poll() is not None:
                raise ServerExited(f"server exited ({process.returncode}) before it was ready: "
                                   f"{_stderr_tail(process, stderr_file)}")
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.1)


def _stderr_tail(process: subprocess.Popen, stderr_file: IO[bytes] | None, chars: int = 2000) -> str:
    """The end of what an exited process wrote to ``stderr_file`` or else its stderr pipe ("" for neither)."""
    if stderr_file is not None:
        stderr_file.seek(0)
        text = stderr_file.read()
    elif process.stderr is not None:
        text = process.stderr.read()
    else:
        return ""
    return (text.decode(errors="replace") if isinstance(text, bytes) else text)[-chars:]


class ServerProcess:
    """``python -m convserve_server`` on loopback; use as a context manager (waits until ready, then stops it).

    Its ports are picked free before it starts, so another socket can take one in between; a server
    that exits because a port is busy is started again on fresh ports.
    """

    BUSY_PORT_RETRIES = 3

    def __init__(self, repository: Path, *flags: str, host: str = "127.0.0.1", port: int | None = None) -> None:
        """Serve ``repository`` with ``flags`` on ``host`` (any 127.x.y.z) and ``port`` (None: a free one).

        Metrics are served on 127.0.0.1 whatever the host, on a port of their own.
        """
        self._repository = repository
        self._flags = flags
        self.host = host
        self._fixed_port = port
        self.process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.port = self._fixed_port if self._fixed_port is not None else free_port()
        self.metrics_port = free_port()
        self.address = f"{self.host}:{self.port}"

    def _start(self) -> None:
        args = [sys.executable, "-m", "convserve_server", "--model-repository", str(self._repository),
                "--host", self.host, "--port", str(self.port), "--metrics-host", "127.0.0.1",
                "--metrics-port", str(self.metrics_port), "--device", "cpu", "--poll-interval-s", "0", *self._flags]
        # A file, not a pipe: nobody reads stderr while the server runs, and a full pipe would block it.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self._stderr,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def __enter__(self) -> ServerProcess:
        for _ in range(self.BUSY_PORT_RETRIES):
            if self._start_and_wait(retry_if_port_busy=True):
                return self
            self._pick_ports()
        self._start_and_wait(retry_if_port_busy=False)
        return self

    def _start_and_wait(self, retry_if_port_busy: bool) -> bool:
        """Start and wait until ready (True); stop it and return False if a port was busy and that may be retried."""
        self._start()
        try:
            self.wait_ready()
            return True
        except BaseException as exc:
            self.__exit__()
            if retry_if_port_busy and isinstance(exc, ServerExited) and any(
                    busy in str(exc) for busy in ("cannot listen on", "cannot serve metrics on")):
                return False
            raise

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()
        if self._stderr is not None:
            self._stderr.close()

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Block until ServerReady says so; :class:`ServerExited`, with its stderr, if the process exits first."""
        assert self.process is not None
        wait_until_ready(self.address, self.process, timeout_s, self._stderr)

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

    def metric(self, name: str, worker: int = 0) -> float:
        """Sum of the samples called exactly ``name`` (with labels) on /metrics of worker ``worker`` (with --workers)."""
        url = f"http://127.0.0.1:{self.metrics_port + worker}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))
