"""preprocess="server": the client sends the encoded files and the server decodes them with the same code."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from convserve_client import AsyncClient, Client, ImageError
from convserve_client.cli import main as classify_main
from tests.models import write_version


@pytest.fixture
def photo_files(tmp_path) -> list:
    """Real photographs cut small, as PNG and JPEG files."""
    paths = []
    for index, picture in enumerate(load_sample_images().images):
        image = Image.fromarray(picture).resize((64, 43))
        for image_format in ("PNG", "JPEG"):
            paths.append(tmp_path / f"photo{index}.{image_format.lower()}")
            image.save(paths[-1], format=image_format)
    return paths


@pytest.fixture
async def server(tmp_path, start_server):
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1, height=16, width=20)
    return await start_server(repository)


def probabilities(results) -> np.ndarray:
    return np.stack([result.probabilities for result in results])


def cmyk_image(path) -> Image.Image:
    return Image.open(path).convert("CMYK")


async def test_server_preprocessing_gives_the_client_paths_probabilities_bit_for_bit(server, photo_files):
    inputs = [*photo_files, photo_files[0].read_bytes(), cmyk_image(photo_files[1]),
              np.asarray(Image.open(photo_files[2]).convert("RGB"))]
    address = f"127.0.0.1:{server.port}"
    with Client(address) as local, Client(address, preprocess="server") as remote:
        expected = await asyncio.to_thread(local.classify, inputs, include_probabilities=True, top_k=3)
        got = await asyncio.to_thread(remote.classify, inputs, include_probabilities=True, top_k=3)
    async with AsyncClient(address, preprocess="server") as client:
        got_async = await client.classify(inputs, include_probabilities=True, top_k=3)
    for results in (got, got_async):
        np.testing.assert_array_equal(probabilities(results), probabilities(expected))
        assert [r.top_k for r in results] == [r.top_k for r in expected]


async def test_an_image_the_server_cannot_decode_is_that_images_error(server, photo_files, tmp_path):
    damaged = photo_files[0].read_bytes()[:200]
    damaged_file = tmp_path / "damaged.png"
    damaged_file.write_bytes(damaged)
    inputs = [photo_files[1], damaged, photo_files[2], b"not an image at all", photo_files[3], damaged_file]
    with Client(f"127.0.0.1:{server.port}", preprocess="server") as client:
        results = await asyncio.to_thread(client.classify, inputs, errors="return")
        good = await asyncio.to_thread(client.classify, [inputs[0], inputs[2], inputs[4]])
        with pytest.raises(ImageError) as caught:
            await asyncio.to_thread(client.classify, inputs)
    assert [r.label for i, r in enumerate(results) if i in (0, 2, 4)] == [r.label for r in good]
    assert all(isinstance(results[i], ImageError) and results[i].index == i for i in (1, 3, 5))
    assert results[1].message.startswith("<200 encoded bytes>: cannot decode image")
    assert results[3].message == "<19 encoded bytes>: not a recognised image format"
    assert results[5].message.startswith(f"{damaged_file}: cannot decode image") and results[5].source == str(damaged_file)
    assert caught.value.index == 1


async def test_cli_server_preprocess_prints_what_the_client_side_path_prints(server, photo_files, capsys):
    argv = [*map(str, photo_files), "--server", f"127.0.0.1:{server.port}", "--top-k", "3", "--json"]
    assert await asyncio.to_thread(classify_main, argv) == 0
    local = capsys.readouterr().out
    assert await asyncio.to_thread(classify_main, [*argv, "--server-preprocess"]) == 0
    assert capsys.readouterr().out == local


def test_preprocess_must_be_client_or_server():
    with pytest.raises(ValueError, match='preprocess must be "client" or "server"'):
        Client("127.0.0.1:1", preprocess="remote")  # type: ignore[arg-type]


async def test_encoded_bytes_over_the_image_limit_are_that_images_error_before_sending(server, photo_files):
    data = photo_files[0].read_bytes()
    with Client(f"127.0.0.1:{server.port}", preprocess="server", max_image_bytes=len(data) - 1) as client:
        results = await asyncio.to_thread(client.classify, [data, photo_files[1]], errors="return")
    assert isinstance(results[0], ImageError) and results[0].index == 0
    assert results[0].message == (f"<{len(data)} encoded bytes>: {len(data):,} encoded bytes, over the limit of "
                                  f"{len(data) - 1:,} per image")
    assert not isinstance(results[1], ImageError)
