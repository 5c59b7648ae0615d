"""The CLI's inputs: folders, files that are not regular files, and waiting for a server that starts late."""

from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import pytest
from PIL import Image

from convserve_bench.processes import free_port
from convserve_client import Client, ImageError
from convserve_client.cli import main as classify_main
from convserve_client.preprocessing import PreprocessingSpec, load_image, preprocess, preprocess_batch


def save_photo(path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)
    return str(path)


def classified(out: str) -> list[str]:
    """The image paths of the result lines (the header lines that name the model start with "# ")."""
    return [line.split("\t")[0] for line in out.strip().splitlines() if not line.startswith("# ")]


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs a FIFO and /dev/zero")
async def test_a_fifo_and_a_device_are_refused_at_once_and_the_rest_classified(tiny_server, tmp_path, capsys):
    good = save_photo(tmp_path / "good.png", 0)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # no writer: reading it would block for ever
    argv = [str(fifo), good, "/dev/zero", "--server", f"127.0.0.1:{tiny_server.port}"]
    code = await asyncio.wait_for(asyncio.to_thread(classify_main, argv), timeout=60)
    out, err = capsys.readouterr()
    assert code == 1 and classified(out) == [good]
    assert err.strip().splitlines() == [f"convserve-classify: {fifo}: not a regular file",
                                        "convserve-classify: /dev/zero: not a regular file"]


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd (Linux)")
def test_a_folder_is_not_a_regular_file_and_leaks_no_descriptor(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    spec = PreprocessingSpec(8, 8)
    with pytest.raises(ImageError, match=f"^{folder}: not a regular file$"):
        preprocess(folder, spec)
    before = open_descriptors()
    for _ in range(100):
        with pytest.raises(ImageError, match="not a regular file"):
            load_image(str(folder))
    assert open_descriptors() == before


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs a FIFO and /dev/zero")
def test_loading_from_a_path_refuses_a_fifo_a_device_and_a_file_over_the_limit(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    good = save_photo(tmp_path / "good.png", 3)
    spec = PreprocessingSpec(8, 8)
    with pytest.raises(ImageError, match=f"^{fifo}: not a regular file$"):
        preprocess(fifo, spec)
    with pytest.raises(ImageError, match="^/dev/zero: not a regular file$"):
        load_image("/dev/zero")
    with pytest.raises(ImageError) as caught:
        preprocess_batch([good, "/dev/zero"], spec)
    assert (caught.value.index, caught.value.source) == (1, "/dev/zero")
    size = os.path.getsize(good)
    with pytest.raises(ImageError, match=f"^{good}: over the limit of {size - 1:,} bytes per image$"):
        preprocess(good, spec, max_bytes=size - 1)
    assert preprocess(good, spec, max_bytes=size).shape == (8, 8, 3)


async def test_a_path_is_read_only_up_to_the_image_byte_limit(tiny_server, tmp_path):
    path = save_photo(tmp_path / "photo.png", 1)
    size = os.path.getsize(path)
    for preprocess in ("client", "server"):
        with Client(f"127.0.0.1:{tiny_server.port}", max_image_bytes=size - 1, preprocess=preprocess) as client:
            result = await asyncio.to_thread(client.classify, [path], errors="return")
            assert isinstance(result[0], ImageError)
            assert result[0].message == f"{path}: over the limit of {size - 1:,} bytes per image"
        with Client(f"127.0.0.1:{tiny_server.port}", max_image_bytes=size, preprocess=preprocess) as client:
            assert (await asyncio.to_thread(client.classify, path))[0].label


async def test_a_folder_stands_for_its_images_and_recursive_for_its_subfolders(tiny_server, tmp_path, capsys):
    top = save_photo(tmp_path / "images" / "b.png", 0)
    jpeg = tmp_path / "images" / "a.JPG"
    Image.open(top).convert("RGB").save(jpeg, format="JPEG")
    nested = save_photo(tmp_path / "images" / "sub" / "c.png", 1)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    server = ["--server", f"127.0.0.1:{tiny_server.port}"]
    assert await asyncio.to_thread(classify_main, [str(tmp_path / "images"), *server]) == 0
    assert classified(capsys.readouterr().out) == [str(jpeg), top]
    assert await asyncio.to_thread(classify_main, [str(tmp_path / "images"), "--recursive", *server]) == 0
    assert classified(capsys.readouterr().out) == [str(jpeg), top, nested]
    (tmp_path / "empty").mkdir()
    assert await asyncio.to_thread(classify_main, [str(tmp_path / "empty"), *server]) == 1
    assert capsys.readouterr().err.strip() == f"convserve-classify: error: no image files in {tmp_path / 'empty'}"


async def test_wait_lets_the_cli_start_before_the_server(tiny_repo, start_server, tmp_path, capsys):
    path = save_photo(tmp_path / "photo.png", 2)
    port = free_port()
    address = ["--server", f"127.0.0.1:{port}", "--timeout", "1"]
    outcome: list[int] = []
    waiting = threading.Thread(target=lambda: outcome.append(classify_main([path, *address, "--wait", "60"])))
    waiting.start()
    # The same command without --wait gives up meanwhile (its retries end with its 1 s timeout).
    assert await asyncio.to_thread(classify_main, [path, *address]) == 1
    assert capsys.readouterr().err.strip() == (
        f"convserve-classify: error: cannot reach the server at 127.0.0.1:{port} (is it running?)")
    assert waiting.is_alive()
    await start_server(tiny_repo, port=port)
    await asyncio.to_thread(waiting.join, 60)
    assert outcome == [0]
    assert classified(capsys.readouterr().out) == [path]
