"""The SDK over replicas that serve different versions of one model, as in the middle of a rollout.

Two ``python -m convserve_server`` processes on loopback, each with its own repository: one serves ``tiny``
version 1, the other version 2.  The client balances over both, so its description of the model may come from
one replica and its request reach the other.  Every result must be what the version that answered computes on
the images preprocessed for that version, and must say which version that was.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort
import pytest

from convserve_bench.processes import ServerProcess
from convserve_client import AsyncClient, Client
from convserve_client.preprocessing import preprocess
from convserve_protocol.preprocessing_spec import PreprocessingSpec
from tests.models import write_version

SERVER_FLAGS = ("--intra-op-threads", "1", "--model-instances", "1", "--log-level", "WARNING")


def serve_both(repositories: list[Path], *flags: str) -> Iterator[list[ServerProcess]]:
    """One server process per repository, started in parallel; all stopped afterwards."""
    servers = [ServerProcess(repository, *SERVER_FLAGS, *flags) for repository in repositories]
    with ThreadPoolExecutor(len(servers)) as pool:
        started = [pool.submit(server.__enter__) for server in servers]
    try:
        for future in started:
            future.result()
        yield servers
    finally:
        for server, future in zip(servers, started):
            if future.exception() is None:
                server.__exit__()


def version_repository(root: Path, version: int, **model: object) -> tuple[Path, Path]:
    """A repository of ``tiny`` at ``version`` alone; returns it and the model file."""
    repository = root / f"v{version}"
    return repository, write_version(repository, "tiny", version, seed=version, **model)


def expected_probabilities(model_path: Path, pictures: list[np.ndarray], spec: PreprocessingSpec) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": np.stack([preprocess(picture, spec) for picture in pictures])})[0]


def pictures(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8) for _ in range(count)]


async def until_both_replicas_answer(client: AsyncClient, tries: int = 50) -> None:
    """Classify one image at a time until both versions have answered: until then the balancer may know only
    the replica it connected to first."""
    seen: set[str] = set()
    for _ in range(tries):
        seen.add((await client.classify(pictures(1)))[0].model_version)
        if len(seen) == 2:
            return
    raise AssertionError(f"only version {seen} answered {tries} calls")


@pytest.fixture(scope="module")
def two_input_sizes(
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, tuple[Path, PreprocessingSpec]]]]:
    """Replica A serves v1 at 8×8, replica B v2 at 16×16 (each test uses a client of its own)."""
    root = tmp_path_factory.mktemp("two-input-sizes")
    v1, v1_model = version_repository(root, 1)
    v2, v2_model = version_repository(root, 2, height=16, width=16)
    models = {"1": (v1_model, PreprocessingSpec(8, 8)), "2": (v2_model, PreprocessingSpec(16, 16))}
    for servers in serve_both([v1, v2]):
        yield ",".join(server.address for server in servers), models


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
async def test_every_call_succeeds_with_the_preprocessing_of_the_version_that_answered(two_input_sizes, client_class):
    address, models = two_input_sizes
    images = pictures(20)
    client = client_class(address, timeout=20)
    try:
        results = []
        for image in images:  # 20 calls one after the other: description and request alternate between replicas
            answer = client.classify(image, include_probabilities=True)
            results += await answer if client_class is AsyncClient else await asyncio.to_thread(lambda: answer)
    finally:
        closed = client.close()
        if client_class is AsyncClient:
            await closed
    assert len(results) == 20
    for image, result in zip(images, results):
        assert result.model_name == "tiny" and result.model_version in models
        model_path, spec = models[result.model_version]
        np.testing.assert_allclose(result.probabilities, expected_probabilities(model_path, [image], spec)[0],
                                   rtol=1e-5, atol=1e-6)


async def test_one_call_over_versions_with_different_labels_says_which_version_gave_each_result(tmp_path):
    labels = {"1": ("ant", "bee", "cat"), "2": ("owl", "pig", "ram", "yak")}
    v1, v1_model = version_repository(tmp_path, 1, labels=labels["1"])
    v2, v2_model = version_repository(tmp_path, 2, labels=labels["2"])
    models = {"1": v1_model, "2": v2_model}
    images = pictures(300)
    for servers in serve_both([v1, v2], "--max-batch-size", "8"):  # 38 requests, balanced over both
        address = ",".join(server.address for server in servers)
        async with AsyncClient(address, timeout=20) as client:
            await until_both_replicas_answer(client)
            results = await client.classify(images, top_k=3, include_probabilities=True)
    versions = [result.model_version for result in results]
    assert set(versions) == {"1", "2"}, "both replicas should have answered part of the call"
    spec = PreprocessingSpec(8, 8)
    for version, model_path in models.items():
        answered = [index for index, found in enumerate(versions) if found == version]
        expected = expected_probabilities(model_path, [images[index] for index in answered], spec)
        for index, probabilities in zip(answered, expected):
            result = results[index]
            assert result.model_name == "tiny"
            assert {prediction.label for prediction in result.top_k} <= set(labels[version])
            assert result.label == labels[version][int(np.argmax(probabilities))]
            np.testing.assert_allclose(result.probabilities, probabilities, rtol=1e-5, atol=1e-6)
