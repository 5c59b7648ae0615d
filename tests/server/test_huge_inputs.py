"""Finite but huge pixel values overflow inside the model: the caller gets INVALID_ARGUMENT, never NaN with OK."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from convserve_protocol.protos import classifier_pb2 as cpb
from convserve_protocol.protos import classifier_pb2_grpc as cpb_grpc


async def classify(port: int, images: np.ndarray) -> cpb.ClassifyResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await cpb_grpc.ClassifierStub(channel).Classify(cpb.ClassifyRequest(
            images=images.astype(np.float32).tobytes(), shape=list(images.shape), top_k=1,
            include_probabilities=True), timeout=10)


@pytest.mark.parametrize("value", [3e38, -3e38, 1e38])
async def test_huge_values_are_invalid_argument_naming_the_image(tiny_server, value):
    images = np.zeros((3, 8, 8, 3), np.float32)
    images[1] = value
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await classify(tiny_server.port, images)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not finite for image(s) 1:" in caught.value.details()


async def test_ordinary_values_are_answered_with_finite_probabilities(tiny_server):
    images = np.random.default_rng(0).random((3, 8, 8, 3), dtype=np.float32) * 255
    reply = await classify(tiny_server.port, images)
    probabilities = np.array([list(result.probabilities) for result in reply.results])
    assert np.isfinite(probabilities).all() and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
