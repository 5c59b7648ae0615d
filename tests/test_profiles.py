"""Install profiles: `make serve` and `make train` install no development tool; `make test` does; the client is light.

What each make target installs is read from ``make -n -B`` (which prints the commands without running them); the
distributions its ``pip install`` lines name are then followed to everything pip would install with them: local
distributions through their pyproject.toml, the others through the metadata of what is installed here (the dev
environment holds all of them), with markers evaluated for this machine, as pip evaluates them.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")

DEV_TOOLS = {"pytest", "hypothesis", "grpcio-tools", "tritonclient"}
"""What the issue names as the dev profile's own: none of it may reach the serve profile."""


def may_be_missing_here(name: str) -> bool:
    """ONNX Runtime's two builds, of which one is installed, and NVIDIA's CUDA libraries, which only the GPU build's
    extras install: a closure may reach these without metadata to follow (they need no Python tool)."""
    return name in {"onnxruntime", "onnxruntime-gpu"} or name.startswith("nvidia-")

CLIENT_PROFILE = {"grpcio", "protobuf", "numpy", "pillow", "typing-extensions"}
"""``pip install ./proto ./client``: the four the client needs, and grpcio's one dependency."""

Wanted = tuple[str, frozenset[str]]
"""A distribution name and the extras asked of it."""


def local_distributions() -> dict[str, tuple[Path, dict]]:
    """Every distribution of the checkout, by name: its folder and its ``[project]`` table."""
    found = {}
    for path in [ROOT / "pyproject.toml", *sorted(ROOT.glob("*/pyproject.toml"))]:
        project = tomllib.loads(path.read_text()).get("project")
        if project:
            found[canonicalize_name(project["name"])] = (path.parent.resolve(), project)
    return found


LOCAL = local_distributions()
BY_FOLDER = {folder: name for name, (folder, _) in LOCAL.items()}


def requirement_texts(name: str) -> list[str]:
    """The requirements of a distribution, extras' ones marked as in installed metadata; KeyError if unknown."""
    if name in LOCAL:
        project = LOCAL[name][1]
        texts = list(project.get("dependencies", []))
        for extra, listed in project.get("optional-dependencies", {}).items():
            texts += [f"{text.split(';')[0]}; {applies_with_extra(text, extra)}" for text in listed]
        return texts
    try:
        return importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        raise KeyError(name) from None


def applies_with_extra(text: str, extra: str) -> str:
    """The marker of an extra's requirement, as installed metadata writes it: its own marker and the extra's."""
    marker = Requirement(text).marker
    return f'({marker}) and extra == "{extra}"' if marker else f'extra == "{extra}"'


def holds(requirement: Requirement, extras: frozenset[str]) -> bool:
    """Whether pip would install ``requirement`` on this machine when ``extras`` are asked for."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in {"", *extras})


def closure(wanted: set[Wanted]) -> tuple[set[str], set[str]]:
    """Every distribution pip would install for ``wanted``, and those of them with no metadata here to follow."""
    names: set[str] = set()
    unknown: set[str] = set()
    todo, seen = list(wanted), set(wanted)
    while todo:
        name, extras = todo.pop()
        names.add(name)
        try:
            texts = requirement_texts(name)
        except KeyError:
            unknown.add(name)
            continue
        for requirement in map(Requirement, texts):
            if holds(requirement, extras):
                dependency = (canonicalize_name(requirement.name), frozenset(requirement.extras))
                if dependency not in seen:
                    seen.add(dependency)
                    todo.append(dependency)
    return names, unknown


def make_plan(target: str, gpu: str) -> list[str]:
    """The commands ``make TARGET`` would run on a fresh checkout (ONNX Runtime's build chosen by GPU=0|1)."""
    plan = subprocess.run([str(MAKE), "-n", "-B", target, f"GPU={gpu}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert plan.returncode == 0, plan.stderr
    return plan.stdout.splitlines()


def pip_installed(plan: list[str]) -> set[Wanted]:
    """The local distributions (with extras) that the plan's ``pip install`` lines name, such as ``-e "./server[gpu]"``."""
    wanted = set()
    for line in plan:
        if re.search(r"\bpip install\b", line):
            for folder, extras in re.findall(r"""(?<![\w/])(\.(?:/[\w.-]+)?)(?:\[([\w,]+)\])?["']?(?=\s|$)""", line):
                name = BY_FOLDER[(ROOT / folder).resolve()]
                wanted.add((name, frozenset(filter(None, extras.split(",")))))
    return wanted


pytestmark = pytest.mark.skipif(MAKE is None, reason="needs GNU make")


@pytest.mark.parametrize("gpu", ["0", "1"])
@pytest.mark.parametrize("target", ["serve", "train"])
def test_make_serve_and_train_install_no_development_tool(target, gpu):
    plan = make_plan(target, gpu)
    wanted = pip_installed(plan)
    assert {name for name, _ in wanted} == {"convserve-protocol", "convserve-client", "convserve-server",
                                            "convserve-training"}, plan
    assert not any("[dev]" in line for line in plan), plan
    names, unknown = closure(wanted)
    assert names.isdisjoint(DEV_TOOLS), sorted(names & DEV_TOOLS)
    assert all(map(may_be_missing_here, unknown)), sorted(unknown)  # everything else was followed to the end
    assert {"grpcio", "tf2onnx", "keras"} <= names and names & {"tensorflow", "tensorflow-cpu"}  # the real needs


@pytest.mark.parametrize("target", ["test", "soak", "bench", "proto"])
def test_make_test_soak_bench_and_proto_install_the_development_tools(target):
    wanted = pip_installed(make_plan(target, "0"))
    assert ("convserve", frozenset({"dev"})) in wanted
    names, _ = closure(wanted)
    assert DEV_TOOLS <= names, sorted(DEV_TOOLS - names)


def test_the_client_and_contract_install_only_four_light_packages():
    names, unknown = closure({("convserve-protocol", frozenset()), ("convserve-client", frozenset())})
    assert unknown == set()
    assert names - set(LOCAL) == CLIENT_PROFILE
