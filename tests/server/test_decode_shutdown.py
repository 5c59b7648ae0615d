"""Closing the image decoder while requests decode: callers get ModelNotReady (UNAVAILABLE), never an internal
error, and the killed decode processes are reaped, their pipes closed, without blocking the event loop."""

from __future__ import annotations

import asyncio
import os
import time
from multiprocessing import forkserver
from pathlib import Path

import numpy as np
import pytest

from convserve_protocol.preprocessing_spec import PreprocessingSpec
from convserve_server.errors import ModelNotReady
from convserve_server.images import ImageDecoder
from tests.conftest import server_config
from tests.images import encode

SPEC = PreprocessingSpec(height=8, width=8, channels=3)
PLAIN_PNG = encode(np.zeros((8, 8, 3), np.uint8), "PNG")  # a small plain PNG: decoded on a thread
JPEG = encode(np.zeros((8, 8, 3), np.uint8), "JPEG")  # not a plain PNG: decoded in a decode process


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def decoder(tmp_path: Path) -> ImageDecoder:
    (tmp_path / "models").mkdir(exist_ok=True)
    return ImageDecoder(server_config(tmp_path / "models", decode_processes=1))


async def test_a_decode_waiting_when_the_decoder_closes_is_model_not_ready(tmp_path):
    images = decoder(tmp_path)
    decoding = asyncio.create_task(images.preprocess([PLAIN_PNG], SPEC))
    await asyncio.sleep(0)  # the call now awaits its first hand-off to a thread (Pillow's plugins)
    images.close()
    with pytest.raises(ModelNotReady, match="shutting down"):
        await decoding


async def test_closing_reaps_the_killed_decode_processes_and_closes_their_pipes(tmp_path):
    images = decoder(tmp_path)
    forkserver.ensure_running()  # multiprocessing's fork server and its pipes stay, once per test process
    baseline = open_descriptors()
    assert (await images.preprocess([JPEG], SPEC)).shape == (1, 8, 8, 3)
    assert open_descriptors() > baseline  # the decode process's pipe and its sentinel
    started = time.monotonic()
    images.close()
    assert time.monotonic() - started < 0.1  # the loop is not held while the processes are reaped
    deadline = time.monotonic() + 10
    while open_descriptors() > baseline:
        assert time.monotonic() < deadline, f"{open_descriptors() - baseline} descriptors still open after close"
        await asyncio.sleep(0.02)
