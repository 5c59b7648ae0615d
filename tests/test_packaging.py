"""pyproject.toml's requirements as pip would pick them on each platform, evaluated with their environment markers."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

PLATFORMS = {
    "linux x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"},
    "linux aarch64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64", "os_name": "posix"},
    "macos arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix"},
    "windows amd64": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64", "os_name": "nt"},
}
NO_GPU_WHEEL = ["linux aarch64", "macos arm64"]


def requirements(extra: str, platform: str) -> dict[str, Requirement]:
    """The requirements ``convserve[extra]`` brings on ``platform`` (its own extras followed), by package name."""
    environment = {**default_environment(), **PLATFORMS[platform], "extra": ""}
    picked: dict[str, Requirement] = {}
    for text in PROJECT["optional-dependencies"][extra]:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        if canonicalize_name(requirement.name) == "convserve":
            for inner in requirement.extras:
                picked.update(requirements(inner, platform))
        else:
            picked[canonicalize_name(requirement.name)] = requirement
    return picked


@pytest.mark.parametrize("platform", NO_GPU_WHEEL)
@pytest.mark.parametrize("extra", ["server", "training", "gpu", "bench", "dev"])
def test_without_gpu_wheels_every_extra_installs_cpu_builds_only(platform, extra):
    picked = requirements(extra, platform)
    assert "onnxruntime-gpu" not in picked and "tensorflow-cpu" not in picked, sorted(picked)
    assert "onnxruntime" in picked  # the CPU build stands in, in the gpu extra too


@pytest.mark.parametrize("platform", NO_GPU_WHEEL)
def test_without_tensorflow_cpu_wheels_training_gets_tensorflow(platform):
    assert "tensorflow" in requirements("training", platform)


def test_on_linux_x86_64_the_gpu_extra_pulls_onnxruntime_gpu_with_cuda_and_cudnn():
    picked = requirements("gpu", "linux x86_64")
    assert set(picked) == {"onnxruntime-gpu"}
    gpu = picked["onnxruntime-gpu"]
    assert gpu.extras == {"cuda", "cudnn"} and str(gpu.specifier) == "<1.32,>=1.31"


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("extra", ["server", "training", "dev"])
def test_without_the_gpu_extra_every_platform_gets_the_cpu_build_of_onnxruntime(platform, extra):
    picked = requirements(extra, platform)
    assert "onnxruntime" in picked and "onnxruntime-gpu" not in picked, sorted(picked)
    assert str(picked["onnxruntime"].specifier) == "<1.32,>=1.31"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_every_platform_gets_exactly_one_tensorflow_and_the_gpu_extra_exactly_one_onnxruntime(platform):
    assert len({"tensorflow", "tensorflow-cpu"} & set(requirements("training", platform))) == 1
    assert len({"onnxruntime", "onnxruntime-gpu"} & set(requirements("gpu", platform))) == 1
