"""``convserve-train`` end to end in real processes: quiet TensorFlow logs, the accuracy gate, the small-split warning.

Two small runs on one folder of identical grey images (so no model can beat the largest class's share of the test
split) start together, once for the module: one with a bar the model meets, one with a bar it cannot meet.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convserve_training.cli import main

CLASSES = ("a", "b", "c")
IMAGES_PER_CLASS = 8
TEST_IMAGES = 5
"""What the default 0.2 test fraction takes of 24 images, stratified: 2, 2 and 1 of the classes."""
MET_BAR = 0.1
"""Below the 1/5 that any constant prediction scores on that split."""
UNREACHABLE_BAR = 0.5
"""Above the 2/5 that the best constant prediction scores: identical images get identical predictions."""
TF_CPP_LOG_LINE = re.compile(r"^[IEWF]\d{4} |absl::InitializeLog", re.MULTILINE)
"""A TensorFlow C++ log line (absl/glog's format: severity letter, then MMDD), or absl's preamble to them."""
RUN_TIMEOUT_S = 600


@dataclass(frozen=True)
class Run:
    """A finished ``convserve-train`` process and the repository it was pointed at."""

    returncode: int
    stdout: str
    stderr: str
    repository: Path


def grey_folder(root: Path) -> Path:
    """Three classes of the same uniform grey image."""
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            Image.fromarray(np.full((12, 12, 3), 128, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def start(data_dir: Path, repository: Path, *extra: str) -> subprocess.Popen[str]:
    # The user's own TF_CPP_MIN_LOG_LEVEL wins over ours: the test runs as a user who set none.
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, "-m", "convserve_training", "--data-dir", str(data_dir),
               "--model-repository", str(repository), "--height", "16", "--width", "16", "--epochs", "2", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen[str], repository: Path) -> Run:
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return Run(process.returncode, stdout, stderr, repository)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The two runs, started side by side: "met" (bar 0.1) and "refused" (bar 0.5)."""
    root = tmp_path_factory.mktemp("gate")
    data_dir = grey_folder(root / "grey")
    repositories = {"met": root / "met-repo", "refused": root / "refused-repo"}
    processes = {
        "met": start(data_dir, repositories["met"], "--min-test-accuracy", str(MET_BAR)),
        "refused": start(data_dir, repositories["refused"], "--min-test-accuracy", str(UNREACHABLE_BAR)),
    }
    return {name: finish(process, repositories[name]) for name, process in processes.items()}


def written(repository: Path) -> list[str]:
    """Every path under the repository, relative to it."""
    return sorted(path.relative_to(repository).as_posix() for path in repository.rglob("*")) if repository.exists() else []


def test_a_met_bar_publishes_and_stderr_has_no_tensorflow_cpp_lines(runs):
    run = runs["met"]
    assert run.returncode == 0, run.stderr
    assert "grey/1/model.onnx" in written(run.repository)
    assert not TF_CPP_LOG_LINE.search(run.stderr), run.stderr
    assert "NodeDef mentions" not in run.stderr
    assert "INFO convserve_training.export: parity: ONNX matches Keras" in run.stderr  # our own logging stays


@pytest.mark.parametrize("name", ["met", "refused"])
def test_keras_epoch_progress_still_reaches_stdout(runs, name):
    stdout = runs[name].stdout
    for epoch in (1, 2):
        assert f"Epoch {epoch}/2" in stdout, stdout
    assert len(re.findall(r"^\d+/\d+ - .* - accuracy: [\d.]+ - loss: ", stdout, re.MULTILINE)) == 2, stdout
    assert re.search(r"^test accuracy [\d.]+ after", stdout, re.MULTILINE), stdout


def test_below_the_bar_the_run_fails_with_one_line_and_writes_nothing(runs):
    run = runs["refused"]
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"convserve-train: error: test accuracy 0\.[0-4]\d* on {TEST_IMAGES} images is below "
                        rf"--min-test-accuracy {UNREACHABLE_BAR:g}; no version written", last), last
    assert "Traceback" not in run.stderr
    assert not TF_CPP_LOG_LINE.search(run.stderr), run.stderr
    # no version, no staging folder: nothing at all was written
    assert written(run.repository) == []


@pytest.mark.parametrize("name", ["met", "refused"])
def test_a_small_test_split_is_one_warning_line_with_its_count(runs, name):
    run = runs[name]
    assert f"test {TEST_IMAGES})" in run.stdout  # the split the dataset line reports
    warnings = [line for line in run.stderr.splitlines() if "test split has only" in line]
    assert len(warnings) == 1, run.stderr
    assert warnings[0].startswith("WARNING ") and f"only {TEST_IMAGES} images (under 50)" in warnings[0]


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_a_bar_outside_0_to_1_is_refused_before_any_work(tmp_path, capsys, value):
    assert main(["--min-test-accuracy", value, "--model-repository", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "convserve-train: error: min_test_accuracy must be between 0 and 1"
    assert written(tmp_path) == []
