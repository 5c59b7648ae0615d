"""A long-lived client follows its server: a hot swap to another input size, and a smaller message limit."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from convserve_client import AsyncClient, Client, MessageTooLargeError
from convserve_client.preprocessing import preprocess
from convserve_protocol.preprocessing_spec import PreprocessingSpec
from tests.models import TINY_LABELS, write_version


def photos(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(24, 36, 3), dtype=np.uint8) for _ in range(count)]


def png(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def onnx_probabilities(model_path, pictures, height: int, width: int) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    batch = np.stack([preprocess(p, PreprocessingSpec(height, width)) for p in pictures])
    return session.run(None, {"image": batch})[0]


def probabilities(results) -> np.ndarray:
    return np.stack([result.probabilities for result in results])


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
async def test_a_long_lived_client_follows_a_hot_swap_to_another_input_size(tmp_path, start_server, client_class):
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1)  # 8×8
    server = await start_server(repository)
    pictures = photos(3)
    client = client_class(f"127.0.0.1:{server.port}")

    async def classify():
        if client_class is Client:
            return await asyncio.to_thread(client.classify, pictures, include_probabilities=True)
        return await client.classify(pictures, include_probabilities=True)

    try:
        before = await classify()
        swapped = write_version(repository, "tiny", 2, height=12, width=10, seed=5)
        await server.core.refresh()
        after = await classify()  # sent at 8×8 first: refused, then the new description, then 12×10
        info = client.model_info()
        info = await info if client_class is AsyncClient else info
    finally:
        closed = client.close()
        if client_class is AsyncClient:
            await closed
    np.testing.assert_allclose(probabilities(before), onnx_probabilities(repository / "tiny/1/model.onnx", pictures, 8, 8),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probabilities(after), onnx_probabilities(swapped, pictures, 12, 10), rtol=1e-5, atol=1e-6)
    assert (info.version, info.preprocessing.height, info.preprocessing.width) == ("2", 12, 10)


async def test_a_client_learns_a_servers_smaller_message_limit(tmp_path, start_server):
    repository = tmp_path / "models"
    model = write_version(repository, "tiny", 1, height=32, width=32)  # 12,288 bytes an image
    server = await start_server(repository, max_message_bytes=40_000)  # three images a request
    pictures = photos(20, seed=1)
    expected = onnx_probabilities(model, pictures, 32, 32)
    with Client(f"127.0.0.1:{server.port}") as client:  # 4 MiB requests by default: all 20 in one
        for _ in range(2):  # the second call sends requests that fit from the start
            results = await asyncio.to_thread(client.classify, pictures, include_probabilities=True)
            np.testing.assert_allclose(probabilities(results), expected, rtol=1e-5, atol=1e-6)
            assert [r.label for r in results] == [TINY_LABELS[i] for i in expected.argmax(axis=1)]
    with Client(f"127.0.0.1:{server.port}", preprocess="server") as client:  # the files' bytes, 32 MiB a request
        encoded = [png(picture) for picture in pictures]
        assert sum(map(len, encoded)) > 40_000
        results = await asyncio.to_thread(client.classify, encoded, include_probabilities=True)
        np.testing.assert_allclose(probabilities(results), expected, rtol=1e-5, atol=1e-6)
        noise = png(np.random.default_rng(2).integers(0, 256, size=(150, 150, 3), dtype=np.uint8))
        with pytest.raises(MessageTooLargeError) as caught:  # one image alone over the limit cannot be split
            await asyncio.to_thread(client.classify, noise)
    assert caught.value.limit == 40_000 and len(noise) > 40_000


async def test_a_new_version_that_crops_differently_is_followed_on_the_same_call(tmp_path, start_server):
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1)  # 8×8, center_to_aspect_ratio
    server = await start_server(repository)
    pictures = photos(3, seed=3)  # 24×36: the two crops keep different pixels
    with Client(f"127.0.0.1:{server.port}") as client:
        await asyncio.to_thread(client.classify, pictures)
        swapped = write_version(repository, "tiny", 2, crop="center", seed=7)  # same input size
        await server.core.refresh()
        results = await asyncio.to_thread(client.classify, pictures, include_probabilities=True)
    session = ort.InferenceSession(str(swapped), providers=["CPUExecutionProvider"])
    batch = np.stack([preprocess(p, PreprocessingSpec(8, 8, crop="center")) for p in pictures])
    np.testing.assert_allclose(probabilities(results), session.run(None, {"image": batch})[0], rtol=1e-5, atol=1e-6)
