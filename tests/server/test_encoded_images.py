"""Classify with encoded_images: the server decodes files with the client's own preprocessing, within limits."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
from sklearn.datasets import load_digits, load_sample_images

from convserve_client.preprocessing import preprocess_batch
from convserve_protocol.preprocessing_spec import PreprocessingSpec
from convserve_protocol.protos import classifier_pb2 as cpb
from convserve_protocol.protos import classifier_pb2_grpc as cpb_grpc
from tests.images import bomb_png, encode
from tests.memory import MIB, peak_rss_bytes, reset_peak_rss
from tests.models import write_version

DIGIT_COUNT = 100

# name: (height, width, crop). Photos are 427x640 and digits 8x8, so each crop mode both crops and resizes.
MODELS = {
    "photo-aspect": (64, 96, "center_to_aspect_ratio"),
    "photo-center": (64, 96, "center"),
    "digit-aspect": (28, 28, "center_to_aspect_ratio"),
    "digit-center": (6, 6, "center"),
}




@pytest.fixture(scope="module")
def photo_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The seed's two sample photos, each as a real JPEG file and a real PNG file."""
    folder = tmp_path_factory.mktemp("photos")
    files = []
    for index, photo in enumerate(load_sample_images().images):
        for suffix, image_format in ((".jpg", "JPEG"), (".png", "PNG")):
            path = folder / f"photo{index}{suffix}"
            path.write_bytes(encode(photo, image_format))
            files.append(path)
    return files


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """100 of scikit-learn's digits, scaled to 0..255 grayscale, as PNG files."""
    folder = tmp_path_factory.mktemp("digits")
    digits = np.round(load_digits().images[:DIGIT_COUNT] * (255.0 / 16)).astype(np.uint8)
    files = []
    for index, digit in enumerate(digits):
        path = folder / f"digit{index:03d}.png"
        path.write_bytes(encode(digit, "PNG"))
        files.append(path)
    return files


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    for name, (height, width, crop) in MODELS.items():
        write_version(repository, name, 1, height=height, width=width, crop=crop)
    return repository


@pytest.fixture
async def server(repository, start_server):
    return await start_server(repository, default_model="digit-aspect")


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield cpb_grpc.ClassifierStub(channel)


def encoded_request(model: str, files: list[bytes], **fields: object) -> cpb.ClassifyRequest:
    return cpb.ClassifyRequest(model_name=model, encoded_images=files, include_probabilities=True, **fields)


def tensor_request(model: str, batch: np.ndarray) -> cpb.ClassifyRequest:
    return cpb.ClassifyRequest(model_name=model, images=batch.astype("<f4").tobytes(), shape=list(batch.shape),
                               include_probabilities=True)


async def client_side_probabilities(stub, model: str, files: list[Path]) -> list[list[float]]:
    """The client's path: read the spec from the server, preprocess locally, send the tensor."""
    info = await stub.GetModelInfo(cpb.GetModelInfoRequest(model_name=model))
    spec = PreprocessingSpec.from_json(info.preprocessing_json)
    response = await stub.Classify(tensor_request(model, preprocess_batch(files, spec)))
    return [list(result.probabilities) for result in response.results]


async def refusal(stub, request: cpb.ClassifyRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Classify(request)
    return caught.value


@pytest.mark.parametrize("model", sorted(MODELS))
async def test_encoded_files_give_the_client_side_probabilities_bit_for_bit(stub, model, photo_files, digit_files):
    files = photo_files if model.startswith("photo") else digit_files
    expected = await client_side_probabilities(stub, model, files)
    response = await stub.Classify(encoded_request(model, [path.read_bytes() for path in files], top_k=2))
    assert [list(result.probabilities) for result in response.results] == expected
    assert len(response.results) == len(files) and all(len(result.top_k) == 2 for result in response.results)


async def test_the_server_follows_each_models_crop_mode(stub, photo_files):
    # The two photo models have the same weights (same seed and size): only their crop modes differ.
    files = [path.read_bytes() for path in photo_files]
    aspect = await stub.Classify(encoded_request("photo-aspect", files))
    center = await stub.Classify(encoded_request("photo-center", files))
    assert [list(r.probabilities) for r in aspect.results] != [list(r.probabilities) for r in center.results]


async def test_a_corrupt_image_is_invalid_argument_naming_its_index(stub, photo_files, digit_files):
    jpeg = photo_files[0].read_bytes()
    good = [path.read_bytes() for path in digit_files[:3]]
    for bad in (jpeg[: len(jpeg) // 2], b"definitely not an image", b""):
        error = await refusal(stub, encoded_request("digit-aspect", [*good, bad, good[0]]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("encoded_images[3]: "), error.details()


async def test_both_a_tensor_and_encoded_images_is_invalid_argument(stub, digit_files):
    request = tensor_request("digit-center", np.zeros((1, 6, 6, 3), np.float32))
    request.encoded_images.append(digit_files[0].read_bytes())
    error = await refusal(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not both" in error.details()


async def test_limits_on_bytes_pixels_and_decoded_size_are_invalid_argument_naming_them(repository, start_server):
    server = await start_server(repository, default_model="digit-aspect", max_image_bytes=20_000,
                                max_encoded_request_bytes=30_000, max_image_pixels=100_000, max_message_bytes=64 * 1024)
    noise = encode(np.random.default_rng(0).integers(0, 256, (70, 70, 3), dtype=np.uint8), "PNG")
    assert 10_000 < len(noise) < 15_000
    digit = encode(np.zeros((8, 8), np.uint8), "PNG")
    cases = [
        ("digit-aspect", [digit, noise + noise], "encoded_images[1]: ", "--max-image-bytes"),
        ("digit-aspect", [noise, noise, noise], "encoded_images: ", "--max-encoded-request-bytes"),
        ("digit-aspect", [digit, encode(np.zeros((300, 400), np.uint8), "PNG")], "encoded_images[1]: ",
         "--max-image-pixels"),
        ("photo-aspect", [digit] * 3, "encoded_images: ", "--max-message-bytes"),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = cpb_grpc.ClassifierStub(channel)
        for model, files, prefix, limit in cases:
            error = await refusal(stub, encoded_request(model, files))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details().startswith(prefix) and limit in error.details(), error.details()
        answered = await stub.Classify(encoded_request("digit-aspect", [digit, noise]))  # just under every limit
        assert len(answered.results) == 2


async def test_a_decompression_bomb_is_refused_quickly_and_cheaply(stub):
    bomb = bomb_png(12_000)
    assert len(bomb) < 32 * 1024
    baseline = reset_peak_rss()
    started = time.monotonic()
    error = await refusal(stub, encoded_request("digit-aspect", [bomb]))
    elapsed = time.monotonic() - started
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "12000x12000" in error.details() and "--max-image-pixels" in error.details()
    # Decoding it as the client used to took 8 s and 2.1 GB; refusing it reads the header only.
    assert elapsed < 2.0
    assert peak_rss_bytes() - baseline < 100 * MIB


async def test_a_big_legal_image_costs_memory_for_its_decode_not_a_float_copy(stub):
    big = bomb_png(6_000)  # 36 megapixels, under the default 50
    baseline = reset_peak_rss()
    response = await stub.Classify(encoded_request("photo-aspect", [big]))
    assert len(response.results) == 1
    # Pillow holds a one-bit image in a byte a pixel (36 MB); RGB float32 of it would be 432 MB.
    assert peak_rss_bytes() - baseline < 150 * MIB


async def test_decoding_runs_off_the_event_loop(stub):
    across, down = np.linspace(0, 255, 4000).astype(np.uint8), np.linspace(0, 255, 3000).astype(np.uint8)[:, None]
    gradients = np.empty((3000, 4000, 3), np.uint8)
    gradients[..., 0], gradients[..., 1], gradients[..., 2] = across, down, across ^ down
    big_jpeg = encode(gradients, "JPEG", quality=90)  # 12 megapixels, decoded 8 times in one request
    tiny = tensor_request("digit-center", np.zeros((1, 6, 6, 3), np.float32))
    await stub.Classify(tiny)

    started = time.monotonic()
    big = asyncio.ensure_future(stub.Classify(encoded_request("photo-aspect", [big_jpeg] * 8)))
    latencies = []
    while not big.done():
        sent = time.monotonic()
        await stub.Classify(tiny)
        latencies.append(time.monotonic() - sent)
    assert len((await big).results) == 8
    big_duration = time.monotonic() - started
    # Had the decode run on the loop, one tiny call would have waited for most of it.
    assert len(latencies) >= 3, (latencies, big_duration)
    assert max(latencies) < big_duration / 3, (max(latencies), big_duration)


def documented_grpcurl_command() -> str:
    """The shell command of docs/protocol.md that classifies an image file with grpcurl."""
    text = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```sh\n")[1:]]
    return next(block for block in blocks if "encoded_images" in block and "grpcurl" in block)


async def test_the_documented_grpcurl_command_classifies_an_image_file(tmp_path, start_server, digit_files):
    command = documented_grpcurl_command()
    if shutil.which("grpcurl") is None:
        pytest.skip("grpcurl is not on PATH (a Go program, which Debian 12 does not package)")
    repository = tmp_path / "models"
    write_version(repository, "digits", 1, labels=tuple("0123456789"), height=28, width=28)
    server = await start_server(repository)
    image = digit_files[7]
    command = command.replace("localhost:8500", f"127.0.0.1:{server.port}").replace("seven.png", str(image))
    process = await asyncio.create_subprocess_exec("bash", "-c", command, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    answer = json.loads(stdout)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        expected = await cpb_grpc.ClassifierStub(channel).Classify(
            cpb.ClassifyRequest(model_name="digits", top_k=3, encoded_images=[image.read_bytes()]))
    assert answer["model_name"] == "digits"
    assert [item["label"] for item in answer["results"][0]["top_k"]] == [p.label for p in expected.results[0].top_k]
