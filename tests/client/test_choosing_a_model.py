"""Choosing the model from Python: per client, per call, and in model_info; every result names its model and version."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from convserve_client import AsyncClient, Client, NotFoundError
from tests.models import write_version

LABELS = {"alpha": ("a0", "a1", "a2"), "beta": ("b0", "b1")}
IMAGE = np.random.default_rng(3).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)


@pytest.fixture
async def server(tmp_path, start_server):
    """alpha (versions 1 and 2, the default) and beta (version 1)."""
    repository = tmp_path / "models"
    for version in (1, 2):
        write_version(repository, "alpha", version, labels=LABELS["alpha"], seed=version)
    write_version(repository, "beta", 1, labels=LABELS["beta"])
    return await start_server(repository, default_model="alpha", versions_per_model=2)


def answered(results) -> list[tuple[str, str]]:
    return [(result.model_name, result.model_version) for result in results]


async def test_a_call_names_its_model_and_version_over_the_clients(server):
    async with AsyncClient(f"127.0.0.1:{server.port}", model_name="beta") as client:
        assert answered(await client.classify([IMAGE, IMAGE])) == [("beta", "1")] * 2
        assert answered(await client.classify(IMAGE, model_name="alpha")) == [("alpha", "2")]
        assert answered(await client.classify(IMAGE, model_name="alpha", model_version="1")) == [("alpha", "1")]
        assert answered(await client.classify(IMAGE, model_name="")) == [("alpha", "2")]  # the server's default
        results = await client.classify(IMAGE, top_k=2)
        assert {prediction.label for prediction in results[0].top_k} == set(LABELS["beta"])
        with pytest.raises(NotFoundError, match="unknown model"):
            await client.classify(IMAGE, model_name="gamma")


async def test_an_unnamed_client_gets_the_servers_default_and_says_so(server):
    with Client(f"127.0.0.1:{server.port}") as client:
        results = await asyncio.to_thread(client.classify, IMAGE)
    assert answered(results) == [("alpha", "2")]


async def test_model_info_takes_the_model_first_and_refresh_only_by_keyword(server):
    with Client(f"127.0.0.1:{server.port}") as client:
        assert (await asyncio.to_thread(client.model_info, "beta")).labels == LABELS["beta"]
        other = await asyncio.to_thread(lambda: client.model_info(model_name="alpha", model_version="1"))
        assert (other.name, other.version) == ("alpha", "1")
        default = await asyncio.to_thread(lambda: client.model_info(refresh=True))
        assert (default.name, default.version) == ("alpha", "2")
        with pytest.raises(TypeError):
            client.model_info(True)  # was refresh=True; a model name is a string
        with pytest.raises(TypeError):
            client.model_info("alpha", "2", True)  # refresh is keyword-only


async def test_the_async_client_chooses_the_same_way(server):
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        await client.wait_until_ready(timeout=10, model_name="beta", model_version="1")
        assert (await client.model_info("beta")).name == "beta"
        assert (await client.model_info(model_name="alpha", refresh=True)).version == "2"
