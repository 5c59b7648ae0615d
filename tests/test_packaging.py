"""The checkout's requirements as pip would pick them on each platform, evaluated with their environment markers.

Every pyproject.toml of the checkout is read (the root one and those of its parts' folders), and a requirement on
one of these local distributions is followed, with its extras, as pip would follow it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def local_projects() -> dict[str, dict]:
    """The ``[project]`` table of every pyproject.toml here, by distribution name."""
    projects = {}
    for path in [ROOT / "pyproject.toml", *sorted(ROOT.glob("*/pyproject.toml"))]:
        project = tomllib.loads(path.read_text()).get("project")
        if project:
            projects[canonicalize_name(project["name"])] = project
    return projects


PROJECTS = local_projects()
TOP = canonicalize_name(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"])
GPU_EXTRA_OWNERS = [name for name, project in PROJECTS.items() if "gpu" in project.get("optional-dependencies", {})]

PLATFORMS = {
    "linux x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"},
    "linux aarch64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64", "os_name": "posix"},
    "macos arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix"},
    "windows amd64": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64", "os_name": "nt"},
}
NO_GPU_WHEEL = ["linux aarch64", "macos arm64"]


def picked(texts: list[tuple[str, str]], platform: str, seen: set[tuple[str, frozenset[str]]]) -> dict[str, Requirement]:
    """The third-party requirements among (requirement, extra it belongs to) whose markers hold on ``platform``."""
    environment = {**default_environment(), **PLATFORMS[platform]}
    found: dict[str, Requirement] = {}
    for text, extra in texts:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({**environment, "extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if name not in PROJECTS:
            found[name] = requirement
        elif (name, frozenset(requirement.extras)) not in seen:
            seen.add((name, frozenset(requirement.extras)))
            found.update(installs(name, requirement.extras, platform, seen))
    return found


def installs(name: str, extras: set[str], platform: str, seen: set | None = None) -> dict[str, Requirement]:
    """What installing local distribution ``name[extras]`` brings on ``platform``, by package name."""
    project = PROJECTS[name]
    texts = [(text, "") for text in project.get("dependencies", [])]
    texts += [(text, extra) for extra in sorted(extras) for text in project.get("optional-dependencies", {})[extra]]
    return picked(texts, platform, seen if seen is not None else {(name, frozenset(extras))})


def gpu_extra(platform: str) -> dict[str, Requirement]:
    """What the ``gpu`` extra itself lists for ``platform`` (installed in place of the CPU build, not beside it)."""
    assert len(GPU_EXTRA_OWNERS) == 1, GPU_EXTRA_OWNERS
    owner = GPU_EXTRA_OWNERS[0]
    return picked([(text, "gpu") for text in PROJECTS[owner]["optional-dependencies"]["gpu"]], platform, set())


@pytest.mark.parametrize("platform", NO_GPU_WHEEL)
def test_without_gpu_wheels_the_install_and_the_gpu_extra_bring_cpu_builds_only(platform):
    for requirements in (installs(TOP, {"dev"}, platform), gpu_extra(platform)):
        assert "onnxruntime-gpu" not in requirements and "tensorflow-cpu" not in requirements, sorted(requirements)
        assert "onnxruntime" in requirements  # the CPU build stands in, in the gpu extra too
    assert "tensorflow" in installs(TOP, {"dev"}, platform)


def test_on_linux_x86_64_the_gpu_extra_pulls_onnxruntime_gpu_with_cuda_and_cudnn():
    requirements = gpu_extra("linux x86_64")
    assert set(requirements) == {"onnxruntime-gpu"}
    gpu = requirements["onnxruntime-gpu"]
    assert gpu.extras == {"cuda", "cudnn"} and gpu.specifier.contains("1.31.1") and not gpu.specifier.contains("1.32.0")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_without_the_gpu_extra_every_platform_installs_the_cpu_build_of_onnxruntime(platform):
    requirements = installs(TOP, {"dev"}, platform)
    assert "onnxruntime" in requirements and "onnxruntime-gpu" not in requirements, sorted(requirements)
    assert requirements["onnxruntime"].specifier.contains("1.31.1")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_every_platform_gets_exactly_one_tensorflow_and_the_gpu_extra_exactly_one_onnxruntime(platform):
    assert len({"tensorflow", "tensorflow-cpu"} & set(installs(TOP, {"dev"}, platform))) == 1
    assert len({"onnxruntime", "onnxruntime-gpu"} & set(gpu_extra(platform))) == 1


def test_linux_x86_64_keeps_the_smaller_tensorflow_cpu():
    assert "tensorflow-cpu" in installs(TOP, {"dev"}, "linux x86_64")
