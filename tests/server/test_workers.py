"""A busy port is a one-line error in every mode, and ``--workers`` never outlive their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convserve_bench.processes import ServerProcess, free_port


def start(repository: Path, port: int, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "convserve_server", "--model-repository", str(repository), "--device", "cpu",
         "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1", "--poll-interval-s", "0", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def one_line_error(process: subprocess.Popen[str]) -> str:
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0, err
    lines = [line for line in err.splitlines() if line.startswith("convserve-serve: error:")]
    assert len(lines) == 1, err
    assert "add_port" not in err, err  # no gRPC log line of its own before ours
    return lines[0]


def children(pid: int) -> list[int]:
    """Process ids of ``pid``'s children, from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("first, second", [
    (("--workers", "2"), ("--workers", "2")),
    (("--workers", "2"), ()),
    ((), ("--workers", "2")),
])
def test_a_second_server_on_a_busy_port_is_a_one_line_error(tiny_repo, first, second):
    with ServerProcess(tiny_repo, *first) as running_server:
        error = one_line_error(start(tiny_repo, running_server.port, *second))
        assert running_server.alive
    assert f"cannot listen on 127.0.0.1:{running_server.port}" in error


def test_workers_stop_when_their_parent_is_killed(tiny_repo):
    port = free_port()
    parent = start(tiny_repo, port, "--workers", "2")
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers := children(parent.pid)) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, "workers never started"
            time.sleep(0.05)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(running(pid) for pid in workers):
            assert time.monotonic() < deadline, "workers outlived their parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        for pid in filter(running, workers):
            os.kill(pid, signal.SIGKILL)
