"""Shared fixtures: model repositories made by the tests, and a real server on a free port."""

from __future__ import annotations

import os
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # as convserve-train sets it: no C++ ERROR lines
# Servers started by tests, in process or as processes, leave Triton's HTTP port 8000 alone: several run at once.
# The HTTP tests (tests/server/http) ask for a free port instead.
os.environ.setdefault("CONVSERVE_HTTP_PORT", "-1")

from convserve_server.app import ConvserveServer, create_server  # noqa: E402
from convserve_server.config import ServerConfig  # noqa: E402
from tests.models import write_version  # noqa: E402


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    """A repository holding model "tiny" version 1 (8×8 input, 4 labels)."""
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1)
    return repository


def server_config(repository: Path, **overrides: object) -> ServerConfig:
    """A config for tests: loopback, free ports, CPU, no repository polling."""
    values: dict[str, object] = dict(
        model_repository=repository, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
        device="cpu", poll_interval_s=0, grace_period_s=10, intra_op_threads=1,
    )
    values.update(overrides)
    return ServerConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def start_server() -> AsyncIterator[Callable[..., object]]:
    """Start real servers (``await start_server(repo, **config)``); all are shut down after the test."""
    servers: list[ConvserveServer] = []

    async def start(repository: Path, warm: bool = True, **overrides: object) -> ConvserveServer:
        server = await create_server(server_config(repository, **overrides))
        servers.append(server)
        if warm:
            await server.start()
        else:
            await server.start_listening()
        return server

    yield start
    for server in servers:
        if not server.stopped:
            await server.shutdown(grace_s=5)


@pytest.fixture
async def tiny_server(tiny_repo: Path, start_server: Callable[..., object]) -> ConvserveServer:
    """A warmed server serving the tiny model."""
    return await start_server(tiny_repo)  # type: ignore[misc, no-any-return]


@pytest.fixture(scope="session")
def default_training(tmp_path_factory: pytest.TempPathFactory):
    """The default training run (bundled digits, default settings) into a fresh repository, once per session."""
    from convserve_training.train import TrainingConfig, run_training

    repository = tmp_path_factory.mktemp("default-models")
    return run_training(TrainingConfig(model_repository=repository, verbose=0), print_fn=lambda line: None)
