"""Values no preprocessing makes (NaN, infinity, 3e38): Classify refuses them; ModelInfer runs them, as Triton does.

Classify ranks labels, and a label ranked from NaN would be a wrong answer with OK, so there a non-finite input or
output is INVALID_ARGUMENT naming the images. ModelInfer is a tensor API: the caller gets the model's output as it
is, and the other images of the request, and of any batch it joined, are untouched.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from convserve_protocol.protos import classifier_pb2 as cpb
from convserve_protocol.protos import classifier_pb2_grpc as cpb_grpc
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.server.test_server import infer_request


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


async def model_infer(port: int, images: np.ndarray) -> np.ndarray:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(images), timeout=10)
    return np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(len(images), -1)


async def test_model_infer_answers_non_finite_rows_as_the_model_computes_them(tiny_repo, tiny_server):
    images = np.random.default_rng(1).random((5, 8, 8, 3), dtype=np.float32)
    images[1, 0, 0, 0] = np.nan
    images[2] = 3e38
    images[3, 4, 4, 1] = -np.inf
    session = ort.InferenceSession(str(tiny_repo / "tiny" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    [computed] = session.run(None, {session.get_inputs()[0].name: images})
    alone = [await model_infer(tiny_server.port, images[i : i + 1]) for i in (0, 4)]
    # Sent together and concurrently with ordinary requests, so that the bad rows share batches with good ones.
    together, *others = await asyncio.gather(model_infer(tiny_server.port, images),
                                             *(model_infer(tiny_server.port, images[[0, 4]]) for _ in range(8)))
    assert not np.isfinite(together[[1, 2, 3]]).all(axis=1).any()
    np.testing.assert_allclose(together, computed, rtol=1e-5, atol=1e-7, equal_nan=True)
    np.testing.assert_allclose(together[[0, 4]], np.concatenate(alone), rtol=1e-5, atol=1e-7)
    for other in others:
        np.testing.assert_allclose(other, np.concatenate(alone), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
async def test_classify_refuses_non_finite_pixels(tiny_server, value):
    images = np.zeros((2, 8, 8, 3), np.float32)
    images[1, 2, 3, 0] = value
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await classify(tiny_server.port, images)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().endswith("NaN or infinity: image(s) 1")
