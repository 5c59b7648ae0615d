"""Train → export → serve → classify PNG files with the shell command: no skew anywhere."""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from PIL import Image

from convserve_protocol.preprocessing_spec import PreprocessingSpec
from convserve_training.data import Dataset, digits_as_uint8, split_dataset


async def test_held_out_digits_as_png_files_reach_the_reported_accuracy(default_training, start_server, tmp_path):
    # The same split as training: indices of the held-out test digits.
    images, targets = digits_as_uint8()
    index = Dataset("digits", np.arange(len(targets))[:, None], targets, tuple(map(str, range(10))))
    test_indices = split_dataset(index, 0.1, 0.2, seed=42).test.images[:, 0]
    paths = []
    for i in test_indices:
        paths.append(tmp_path / f"digit{i}_{targets[i]}.png")
        Image.fromarray(images[i]).save(paths[-1])

    repository = default_training.model_path.parents[2]
    server = await start_server(repository)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "convserve_client.cli", *map(str, paths), "--server", f"127.0.0.1:{server.port}", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()[-2000:]
    results = json.loads(stdout)
    assert len(results) == len(paths) == 360
    correct = sum(r["label"] == str(targets[i]) for r, i in zip(results, test_indices))
    served_accuracy = correct / len(paths)
    assert abs(served_accuracy - default_training.metrics["test_accuracy"]) <= 0.005
    assert PreprocessingSpec(28, 28) == default_training.card.preprocessing
