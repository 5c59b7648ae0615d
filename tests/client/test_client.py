"""Both clients and the CLI against a real server: input kinds, order, retries, deadlines, errors."""

from __future__ import annotations

import asyncio
import io
import json
import threading

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from convserve_bench.processes import free_port
from convserve_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    DeadlineExceededError,
    ImageError,
    InvalidArgumentError,
    NotFoundError,
    OverloadedError,
    RetryPolicy,
    UnavailableError,
)
from convserve_client.cli import main as classify_main
from convserve_client.errors import from_rpc_error
from convserve_protocol.protos import classifier_pb2, classifier_pb2_grpc
from convserve_client.preprocessing import preprocess
from convserve_protocol.preprocessing_spec import PreprocessingSpec
from tests.models import TINY_LABELS

FAST_RETRY = RetryPolicy(max_attempts=40, initial_backoff=0.01, max_backoff=0.1)


def photo(seed: int, size: tuple[int, int] = (30, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def expected_labels(repo, pictures) -> list[str]:
    session = ort.InferenceSession(str(repo / "tiny/1/model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.stack([preprocess(p, PreprocessingSpec(8, 8)) for p in pictures])
    return [TINY_LABELS[i] for i in session.run(None, {"image": batch})[0].argmax(axis=1)]


def as_every_kind(pictures, tmp_path) -> list[object]:
    """The same pictures as a path, PNG bytes, a Pillow image and an array, in turn."""
    kinds: list[object] = []
    for i, picture in enumerate(pictures):
        if i % 4 == 0:
            path = tmp_path / f"p{i}.png"
            Image.fromarray(picture).save(path)
            kinds.append(path)
        elif i % 4 == 1:
            buffer = io.BytesIO()
            Image.fromarray(picture).save(buffer, format="PNG")
            kinds.append(buffer.getvalue())
        elif i % 4 == 2:
            kinds.append(Image.fromarray(picture))
        else:
            kinds.append(picture)
    return kinds


async def test_both_clients_give_identical_results_for_every_input_kind(tiny_server, tiny_repo, tmp_path):
    pictures = [photo(i) for i in range(9)]
    inputs = as_every_kind(pictures, tmp_path)
    address = f"127.0.0.1:{tiny_server.port}"

    def sync_classify():
        with Client(address) as client:
            client.wait_until_ready(5)
            return client.classify(inputs, top_k=2, include_probabilities=True)

    sync_results = await asyncio.to_thread(sync_classify)
    async with AsyncClient(address) as client:
        await client.wait_until_ready(5)
        async_results = await client.classify(inputs, top_k=2, include_probabilities=True)
    assert [r.label for r in sync_results] == expected_labels(tiny_repo, pictures)
    for a, b in zip(sync_results, async_results):
        assert a.top_k == b.top_k
        np.testing.assert_array_equal(a.probabilities, b.probabilities)
        assert len(a.top_k) == 2 and a.score >= a.top_k[1].score


async def test_model_info_comes_from_the_server(tiny_server):
    async with AsyncClient(f"127.0.0.1:{tiny_server.port}") as client:
        info = await client.model_info()
    assert info.labels == TINY_LABELS and info.preprocessing == PreprocessingSpec(8, 8)
    assert info.max_batch_size == 64 and info.execution_provider == "CPUExecutionProvider"
    assert info.card.dataset == "synthetic"
    assert info.verified is False and info.verification_worst_difference is None  # the tiny file has no golden vectors


async def test_long_lists_are_chunked_and_come_back_in_input_order(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_batch_size=4)
    pictures = [photo(i, (10 + i % 5, 12)) for i in range(23)]
    async with AsyncClient(f"127.0.0.1:{server.port}", max_in_flight=3) as client:
        results = await client.classify(pictures)
    assert [r.label for r in results] == expected_labels(tiny_repo, pictures)
    with Client(f"127.0.0.1:{server.port}", max_in_flight=3) as client:
        sync_results = await asyncio.to_thread(client.classify, pictures)
    assert [r.label for r in sync_results] == [r.label for r in results]


async def test_undecodable_image_is_that_images_error(tiny_server, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    async with AsyncClient(f"127.0.0.1:{tiny_server.port}") as client:
        results = await client.classify([photo(1), broken, photo(2)], errors="return")
        assert isinstance(results[1], ImageError) and "broken.jpg" in str(results[1]) and results[1].index == 1
        assert all(not isinstance(r, ImageError) for r in (results[0], results[2]))
        with pytest.raises(ImageError, match="broken.jpg"):
            await client.classify([photo(1), broken])


async def test_server_errors_become_typed_exceptions_keeping_code_and_message(tiny_server):
    address = f"127.0.0.1:{tiny_server.port}"
    async with AsyncClient(address, model_name="nope") as client:
        with pytest.raises(NotFoundError) as caught:
            await client.classify([photo(0)])
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and "unknown model 'nope'" in caught.value.message
    async with AsyncClient(address) as client:
        with pytest.raises(ValueError, match="top_k must be between 1 and 4"):
            await client.classify([photo(0)], top_k=9)
    async with grpc.aio.insecure_channel(address) as channel:  # a request the SDK would never send
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await classifier_pb2_grpc.ClassifierStub(channel).Classify(classifier_pb2.ClassifyRequest(shape=[1, 2]))
    error = from_rpc_error(raw.value)
    assert isinstance(error, InvalidArgumentError) and "4 dimensions" in error.message
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_client_retries_until_a_briefly_down_server_comes_up(tiny_repo, start_server):
    port = free_port()
    pictures = [photo(i) for i in range(3)]
    async with AsyncClient(f"127.0.0.1:{port}", retry=FAST_RETRY, timeout=20) as client:
        call = asyncio.ensure_future(client.classify(pictures))
        await asyncio.sleep(0.3)
        assert not call.done(), "the client must still be retrying while nothing listens"
        await start_server(tiny_repo, port=port)
        results = await call
    assert [r.label for r in results] == expected_labels(tiny_repo, pictures)


async def test_sync_client_retries_too(tiny_repo, start_server):
    port = free_port()
    client = Client(f"127.0.0.1:{port}", retry=FAST_RETRY, timeout=20)
    outcome: dict[str, object] = {}
    worker = threading.Thread(target=lambda: outcome.update(result=client.classify([photo(0)])))
    worker.start()
    await asyncio.sleep(0.3)
    assert worker.is_alive()
    await start_server(tiny_repo, port=port)
    await asyncio.to_thread(worker.join, 20)
    client.close()
    assert outcome["result"][0].label == expected_labels(tiny_repo, [photo(0)])[0]


async def test_unavailable_is_raised_once_retries_are_spent():
    async with AsyncClient(f"127.0.0.1:{free_port()}", retry=RetryPolicy(max_attempts=2, initial_backoff=0.01)) as client:
        with pytest.raises(UnavailableError):
            await client.model_info()


async def test_overload_is_retried_then_raised(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_queue_size=1, max_queue_delay_us=3_000_000, max_batch_size=64)
    address = f"127.0.0.1:{server.port}"
    async with AsyncClient(address) as warm:
        await warm.model_info()
        hog = asyncio.ensure_future(warm.classify([photo(0)]))
        await asyncio.sleep(0.2)
        async with AsyncClient(address, retry=RetryPolicy(max_attempts=3, initial_backoff=0.01)) as client:
            await client.model_info()
            with pytest.raises(OverloadedError) as caught:
                await client.classify([photo(1)])
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(await hog) == 1


async def test_deadline_applies_to_each_call(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_queue_delay_us=2_000_000)
    async with AsyncClient(f"127.0.0.1:{server.port}", timeout=0.3) as client:
        await client.model_info()
        with pytest.raises(DeadlineExceededError):
            await client.classify([photo(0)])


def test_wait_until_ready_gives_up_after_its_timeout():
    with Client(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(DeadlineExceededError, match="not ready after 0.5 s"):
            client.wait_until_ready(0.5)


async def test_cli_prints_a_line_per_image_and_fails_only_the_bad_one(tiny_server, tiny_repo, tmp_path, capsys):
    pictures = [photo(i) for i in range(3)]
    paths = []
    for i, picture in enumerate(pictures):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(picture).save(paths[-1])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    args = ["--server", f"127.0.0.1:{tiny_server.port}", "--top-k", "2"]
    code = await asyncio.to_thread(classify_main, [*paths[:2], str(bad), paths[2], *args])
    out, err = capsys.readouterr()
    assert code == 1
    header, *lines = out.strip().splitlines()
    assert header == "# model tiny version 1"
    assert [line.split("\t")[0] for line in lines] == [paths[0], paths[1], paths[2]]
    assert [line.split("\t")[1].split()[0] for line in lines] == expected_labels(tiny_repo, pictures)
    assert len(lines[0].split("\t")) == 3
    assert "bad.png" in err and len(err.strip().splitlines()) == 1
    code = await asyncio.to_thread(classify_main, [*paths, *args, "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and [d["label"] for d in document] == expected_labels(tiny_repo, pictures)
    assert {(d["model_name"], d["model_version"]) for d in document} == {("tiny", "1")}


def test_cli_without_a_server_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "x.png"
    Image.fromarray(photo(0)).save(path)
    port = free_port()
    code = classify_main([str(path), "--server", f"127.0.0.1:{port}", "--timeout", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0] == f"convserve-classify: error: cannot reach the server at 127.0.0.1:{port} (is it running?)"


async def test_bearer_token_is_required_except_for_health(tiny_repo, start_server):
    server = await start_server(tiny_repo, auth_token="s3cret")
    address = f"127.0.0.1:{server.port}"
    async with AsyncClient(address) as anonymous:
        with pytest.raises(AuthenticationError) as caught:
            await anonymous.classify([photo(0)])
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with AsyncClient(address, token="wrong") as wrong:
        with pytest.raises(AuthenticationError):
            await wrong.model_info()
    async with AsyncClient(address, token="s3cret") as client:
        assert len(await client.classify([photo(0), photo(1)])) == 2
    async with grpc.aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING
