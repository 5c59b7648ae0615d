"""``convserve-train`` on folders the tests build themselves: versions, labels, and every bad input."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convserve_training.cli import main, present_model
from convserve_training.config import TrainingConfig

COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def make_class(folder: Path, colour: tuple[int, int, int], count: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3)
        pixels = np.clip(rng.normal(colour, 25, size=size), 0, 255).astype(np.uint8)
        suffix = ".png" if i % 2 else ".jpg"
        Image.fromarray(pixels).save(folder / f"img{i}{suffix}")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "colours"
    for seed, (name, colour) in enumerate(COLOURS.items()):
        make_class(root / name, colour, 10, seed)
    return root


def train(args: list[str]) -> int:
    return main([*args, "--epochs", "2", "--quiet"])


def model_files(repository: Path) -> list[Path]:
    return sorted(repository.glob("**/model.onnx"))


def test_tiny_data_dir_trains_and_each_run_writes_the_next_version(data_dir, tmp_path):
    from convserve_protocol.model_card import ModelCard
    import onnx

    repository = tmp_path / "repo"
    # A model file left in a staging folder by an interrupted run is no version: --skip-if-present trains.
    leftover = repository / "colours" / ".staging-interrupted" / "model.onnx"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half-written")
    assert train(["--data-dir", str(data_dir), "--model-repository", str(repository), "--height", "16", "--width", "16",
                  "--skip-if-present"]) == 0
    leftover.unlink()
    leftover.parent.rmdir()
    assert train(["--data-dir", str(data_dir), "--model-repository", str(repository), "--height", "16", "--width", "16"]) == 0
    assert [p.relative_to(repository).as_posix() for p in model_files(repository)] == [
        "colours/1/model.onnx", "colours/2/model.onnx",
    ]
    model = onnx.load(str(repository / "colours/2/model.onnx"))
    card = ModelCard.from_metadata({p.key: p.value for p in model.metadata_props})
    assert card.labels == ("blue", "green", "red")
    assert card.model_version == "2" and card.dataset == "colours"
    assert (card.preprocessing.height, card.preprocessing.width) == (16, 16)


def test_corrupt_images_are_skipped_with_a_warning(data_dir, tmp_path, caplog):
    (data_dir / "red" / "broken.png").write_bytes(b"not an image at all")
    (data_dir / "red" / "truncated.jpg").write_bytes((data_dir / "red" / "img0.jpg").read_bytes()[:40])
    repository = tmp_path / "repo"
    assert train(["--data-dir", str(data_dir), "--model-repository", str(repository), "--height", "16", "--width", "16"]) == 0
    assert "skipped 2 unreadable image(s)" in caplog.text
    assert len(model_files(repository)) == 1


def bad_dirs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    single = tmp_path / "single"
    make_class(single / "only", (1, 2, 3), 6, 0)
    no_images = tmp_path / "no_images"
    make_class(no_images / "good", (1, 2, 3), 6, 0)
    (no_images / "bare").mkdir()
    (no_images / "bare" / "notes.txt").write_text("not an image")
    too_few = tmp_path / "too_few"
    make_class(too_few / "good", (1, 2, 3), 6, 0)
    (too_few / "bad").mkdir()
    for i in range(6):
        (too_few / "bad" / f"x{i}.png").write_bytes(b"garbage")
    (too_few / "bad" / "ok.png").write_bytes((too_few / "good" / "img1.png").read_bytes())
    return {
        "missing": (tmp_path / "does-not-exist", "no such directory"),
        "empty": (empty, "no class folders"),
        "single-class": (single, "only one class"),
        "class-without-images": (no_images, "has no JPEG or PNG images"),
        "too-few-readable": (too_few, "has 1 readable images; at least 5"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "single-class", "class-without-images", "too-few-readable"])
def test_bad_data_dir_is_a_one_line_error_and_leaves_no_model(case, tmp_path, capsys):
    data, message = bad_dirs(tmp_path)[case]
    repository = tmp_path / "repo"
    assert train(["--data-dir", str(data), "--model-repository", str(repository)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("convserve-train: error:") and message in err[-1]
    assert model_files(repository) == []
    assert not list(repository.glob("**/.staging-*"))


def test_a_missing_data_dir_is_refused_before_tensorflow_loads(tmp_path):
    script = ("import sys; from convserve_training.cli import main; "
              f"code = main(['--data-dir', {str(tmp_path / 'missing')!r}]); print(code, 'tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["1", "False"], done.stderr
    assert done.stderr.strip() == f"convserve-train: error: --data-dir {tmp_path / 'missing'}: no such directory"


def test_bad_flags_are_refused_before_any_work(tmp_path, capsys):
    assert main(["--epochs", "0", "--model-repository", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "convserve-train: error: epochs and batch_size must be >= 1"
    with pytest.raises(SystemExit) as exited:
        main(["--crop", "stretch"])
    assert exited.value.code == 2
    assert "invalid choice: 'stretch'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0


def newest_model_file(model_dir: Path) -> Path | None:
    """What --skip-if-present finds for the model in ``model_dir``."""
    return present_model(TrainingConfig(model_repository=model_dir.parent, model_name=model_dir.name))


def test_only_numbered_versions_holding_a_model_file_count_as_present(tmp_path):
    model_dir = tmp_path / "colours"
    assert newest_model_file(model_dir) is None
    for folder in (".staging-abc", "9", "10", "11"):
        (model_dir / folder).mkdir(parents=True)
    (model_dir / ".staging-abc" / "model.onnx").write_bytes(b"left over")
    assert newest_model_file(model_dir) is None
    (model_dir / "9" / "model.onnx").write_bytes(b"nine")
    (model_dir / "10" / "model.onnx").write_bytes(b"ten")
    # "11" is empty: not a model; "10" outranks "9" as a number, not as text.
    assert newest_model_file(model_dir) == model_dir / "10" / "model.onnx"


FAST_PATH_DRIVER = """
import json, sys
from convserve_training.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(name for name in ("tensorflow", "keras", "tf2onnx") if name in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""
"""Runs the command in a fresh interpreter and reports its exit code and the heavy modules it loaded."""

FAST_PATH_CPU_S = 2.0
"""The issue's bound for these paths (17-30 s when they loaded TensorFlow). CPU time, not wall time,
so that the other processes on a loaded machine cannot fail the test."""


def run_fast_path(*args: str) -> tuple[int, list[str], str, str]:
    """The command in a subprocess: exit code, heavy modules loaded, stdout before the report, stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-c", FAST_PATH_DRIVER, *args], capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu_s < FAST_PATH_CPU_S, f"{args} took {cpu_s:.2f} s of CPU"
    *output, report_line = done.stdout.splitlines()
    report = json.loads(report_line)
    return report["code"], report["heavy"], "\n".join(output), done.stderr


def test_help_argument_errors_and_skip_if_present_do_not_import_tensorflow(tmp_path):
    code, heavy, output, _ = run_fast_path("--help")
    assert (code, heavy) == (0, []) and "--crop {center_to_aspect_ratio,center}" in output

    code, heavy, _, err = run_fast_path("--crop", "stretch")
    assert (code, heavy) == (2, []) and "invalid choice: 'stretch'" in err
    code, heavy, _, err = run_fast_path("--height", "4")
    assert (code, heavy) == (2, []) and err.strip() == "convserve-train: error: height and width must be at least 10 " \
        "(two 3x3 convolutions and two poolings)"

    repository = tmp_path / "repo"
    for folder in ("1", ".staging-xyz"):
        (repository / "photos" / folder).mkdir(parents=True)
        (repository / "photos" / folder / "model.onnx").write_bytes(b"a model")
    code, heavy, output, _ = run_fast_path("--skip-if-present", "--model-repository", str(repository),
                                           "--model-name", "photos")
    assert (code, heavy) == (0, [])
    assert output == f"{repository / 'photos' / '1' / 'model.onnx'} exists; not training (--skip-if-present)"


def test_golden_count_and_tolerance_are_recorded_in_the_card(data_dir, tmp_path):
    from convserve_protocol.model_card import ModelCard
    import onnx

    repository = tmp_path / "repo"
    assert train(["--data-dir", str(data_dir), "--model-repository", str(repository), "--height", "16", "--width", "16",
                  "--golden-count", "4", "--golden-tolerance", "0.002"]) == 0
    model = onnx.load(str(repository / "colours/1/model.onnx"))
    golden = ModelCard.from_metadata({p.key: p.value for p in model.metadata_props}).golden
    assert golden is not None and golden.count == 4 and golden.tolerance == 0.002
    dominant_channels = golden.inputs.mean(axis=(1, 2)).argmax(axis=1)  # red, green or blue images
    assert set(dominant_channels.tolist()) == {0, 1, 2}, "the held-out images chosen cover every class"


@pytest.mark.parametrize("flags", [["--golden-count", "-1"], ["--golden-tolerance", "0"], ["--golden-tolerance", "inf"]])
def test_bad_golden_flags_are_one_error_line(flags, tmp_path, capsys):
    assert main([*flags, "--model-repository", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("convserve-train: error: golden_count must be >= 0")
