"""Real server processes on free loopback ports, for the benchmark and the tests, and what they cost in CPU and memory.

:class:`ServerProcess` runs ``python -m convserve_server``; :class:`ChildServer` runs any
module that takes ``--host`` and ``--port`` and answers ``ServerReady`` (the reference servers do).
"""

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

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc

LOOPBACK = "127.0.0.1"
READY_POLL_S = 0.1


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class ServerNotReady(Exception):
    """No server became ready at an address in the time allowed."""


class ServerExited(ServerNotReady):
    """The server process exited before it was ready; the message ends with its stderr."""

    def __init__(self, name: str, returncode: int, stderr: str) -> None:
        super().__init__(f"{name} exited ({returncode}) before it was ready: {stderr}")
        self.name = name
        self.returncode = returncode
        self.stderr = stderr

    def one_line(self) -> str:
        """The message with only the last line the process wrote to stderr."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return f"{self.name} exited ({self.returncode}) before it was ready: {lines[-1] if lines else '(nothing on stderr)'}"


def wait_until_ready(address: str, process: subprocess.Popen | None, timeout_s: float = 60,
                     stderr_file: IO[bytes] | None = None, name: str = "server") -> None:
    """Block until the server at ``address`` says it is ready.

    :class:`ServerExited` if ``process`` exits first, its message ending with what it wrote to stderr (its pipe,
    or ``stderr_file`` if it wrote there); :class:`ServerNotReady` when ``timeout_s`` runs out.
    """
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise ServerExited(name, process.returncode, _stderr_tail(process, stderr_file))
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() >= deadline:
                raise ServerNotReady(f"no server ready at {address} after {timeout_s:.0f} s")
            time.sleep(READY_POLL_S)


def wait_until_http_ready(address: str, timeout_s: float = 60) -> None:
    """Block until ``GET /v2/health/ready`` at ``address`` (HOST:PORT) answers 200; :class:`ServerNotReady` when
    ``timeout_s`` runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}/v2/health/ready", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:  # refused, timed out, or an HTTP error status
            pass
        if time.monotonic() >= deadline:
            raise ServerNotReady(f"no HTTP server ready at {address} after {timeout_s:.0f} s")
        time.sleep(READY_POLL_S)


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


class ChildServer:
    """``python -m MODULE --host 127.0.0.1 --port N FLAGS...``; a context manager that waits until ready, then stops it.

    Its ports are picked free before it starts, so another socket can take one in between; a server
    that exits because a port is busy is started again on fresh ports.
    """

    BUSY_PORT_RETRIES = 3
    BUSY_PORT_MESSAGES = ("cannot listen on", "cannot serve metrics on")

    def __init__(self, module: str, *flags: str, ready_timeout_s: float = 60, host: str = LOOPBACK,
                 port: int | None = None) -> None:
        """Serve on ``host`` (any 127.x.y.z) and ``port`` (None: a free one, picked again if it turns out busy)."""
        self.module = module
        self.flags = flags
        self.ready_timeout_s = ready_timeout_s
        self.host = host
        self._fixed_port = port
        self.process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.port = self._fixed_port if self._fixed_port is not None else free_port()
        self.address = f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The command line that starts the server."""
        return [sys.executable, "-m", self.module, "--host", self.host, "--port", str(self.port), *self.flags]

    def _start(self) -> None:
        # A file, not a pipe: nobody reads stderr while the server runs, and a full pipe would block it.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=self._stderr,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def __enter__(self) -> ChildServer:
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
            self.wait_ready(self.ready_timeout_s)
            return True
        except BaseException as exc:
            self.__exit__()
            if retry_if_port_busy and isinstance(exc, ServerExited) and any(
                    busy in exc.stderr for busy in self.BUSY_PORT_MESSAGES):
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
        wait_until_ready(self.address, self.process, timeout_s, self._stderr, name=self.module)

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process is not None and self.process.poll() is None

    def rss_mb(self) -> float:
        """Resident memory of the server process (not its children)."""
        assert self.process is not None
        return rss_mb([self.process.pid])

    def process_tree(self) -> list[int]:
        """The server's process and its descendants (with ``--workers N`` they are its workers)."""
        assert self.process is not None
        return process_tree(self.process.pid)


class ServerProcess(ChildServer):
    """``python -m convserve_server`` on loopback, on the CPU, with its metrics on a second free port (and with
    ``http=True`` its HTTP/REST port on a third)."""

    def __init__(self, repository: Path, *flags: str, ready_timeout_s: float = 60, host: str = LOOPBACK,
                 port: int | None = None, http: bool = False) -> None:
        """Metrics, and with ``http`` the HTTP/REST endpoint, are served on 127.0.0.1 whatever ``host``, on free
        ports of their own; without ``http`` the server's HTTP settings are left as they are."""
        self.repository = repository
        self.http = http
        super().__init__("convserve_server", *flags, ready_timeout_s=ready_timeout_s, host=host, port=port)

    def _pick_ports(self) -> None:
        super()._pick_ports()
        self.metrics_port = free_port()
        self.http_port = free_port() if self.http else None
        self.http_address = f"{LOOPBACK}:{self.http_port}" if self.http else None

    def command(self) -> list[str]:
        """The server's command line; ``flags`` come last, so they override these defaults."""
        http = ["--http-host", LOOPBACK, "--http-port", str(self.http_port)] if self.http else []
        return [sys.executable, "-m", self.module, "--model-repository", str(self.repository),
                "--host", self.host, "--port", str(self.port), "--metrics-host", LOOPBACK,
                "--metrics-port", str(self.metrics_port), *http, "--device", "cpu", "--poll-interval-s", "0",
                *self.flags]

    def metric(self, name: str, worker: int = 0) -> float:
        """Sum of the samples called exactly ``name``, labels included (``x{model="m"}``), on /metrics of worker
        ``worker`` (with --workers)."""
        return sum(value for sample, value in metric_samples(LOOPBACK, self.metrics_port + worker) if sample == name)


def wait_until_serving_metrics(host: str, ports: list[int], timeout_s: float = 60) -> None:
    """Block until every one of ``ports`` answers /metrics: with ``--workers N`` the first worker can be ready
    before the others. :class:`ServerNotReady` when ``timeout_s`` runs out."""
    deadline = time.monotonic() + timeout_s
    waiting = list(ports)
    while waiting:
        try:
            metric_samples(host, waiting[0])
            waiting.pop(0)
            continue
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise ServerNotReady(f"no metrics at {host}:{waiting[0]} after {timeout_s:.0f} s")
        time.sleep(READY_POLL_S)


def metric_samples(host: str, port: int) -> list[tuple[str, float]]:
    """Every sample on a Prometheus endpoint, as (name with labels, value)."""
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    return [(line.rsplit(" ", 1)[0], float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
            if line and not line.startswith("#")]


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it.

    Read it once, when the server is ready (its workers are all started by then), so that measuring
    does not scan ``/proc`` on a loaded machine.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # it exited meanwhile
        children.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], [pid]
    while pending:
        tree.append(pending.pop())
        pending.extend(children.get(tree[-1], []))
    return tree


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes (NaN once they have all exited, never a reassuring 0)."""
    total, read = 0.0, False
    for member in pids:
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except OSError:
            continue
        read = True
        total += sum(int(line.split()[1]) / 1024 for line in lines if line.startswith("VmRSS:"))
    return total if read else float("nan")


def host_cpu_ticks() -> tuple[int, int]:
    """(stolen, all) CPU ticks of this machine so far, from ``/proc/stat``; (0, 0) where it cannot be read.

    Steal is time the hypervisor gave the VM's CPUs to someone else: on a shared VM it swings from one round to
    the next and moves throughput with it, so the report shows it beside each step.
    """
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time so far of these processes and their threads (0 if none are known)."""
    total = 0
    for member in pids:
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")
