"""docker-compose.yml's structure, parsed (no Docker engine runs here)."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


class ComposeLoader(yaml.SafeLoader):
    """Safe YAML plus compose's ``!reset`` tag."""


ComposeLoader.add_constructor("!reset", lambda loader, node: {"__reset__": True})


def load(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("docker-compose.yml")


def test_trainer_is_one_shot_and_writes_the_named_volume(compose):
    trainer = compose["services"]["trainer"]
    assert trainer["restart"] == "no"
    assert "models:/models" in trainer["volumes"]
    assert "--skip-if-present" in trainer["command"]
    assert "models" in compose["volumes"]


def test_server_waits_for_training_and_is_health_checked_over_grpc(compose):
    server = compose["services"]["server"]
    assert server["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert "convserve_server.healthcheck" in server["healthcheck"]["test"]
    assert server["restart"] == "unless-stopped"
    assert "8500:8500" in server["ports"]
    assert "models:/models:ro" in server["volumes"]


def test_server_reserves_an_nvidia_gpu_and_the_cpu_override_removes_it(compose):
    device = compose["services"]["server"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert compose["services"]["server"]["environment"]["CONVSERVE_DEVICE"] == "cuda"
    cpu = load("docker-compose.cpu.yml")["services"]["server"]
    assert cpu["deploy"] == {"__reset__": True} and cpu["environment"]["CONVSERVE_DEVICE"] == "cpu"


def test_client_classifies_the_samples_once_the_server_is_healthy(compose):
    client = compose["services"]["client"]
    assert client["depends_on"]["server"]["condition"] == "service_healthy"
    assert "convserve-classify" in client["command"][0] and "server:8500" in client["command"][0]


@pytest.mark.parametrize("dockerfile", ["server/Dockerfile", "training/Dockerfile"])
def test_images_are_pinned_and_run_as_non_root(dockerfile):
    text = (ROOT / dockerfile).read_text()
    base = next(line.split()[1] for line in text.splitlines() if line.startswith("FROM "))
    assert ":" in base and not base.endswith(":latest") and base.split(":")[1][0].isdigit()
    assert "\nUSER convserve" in text and "useradd" in text


def test_server_image_installs_only_the_contract_and_the_server():
    lines = (ROOT / "server/Dockerfile").read_text().splitlines()
    installs = " ".join(line for line in lines if not line.lstrip().startswith("#"))
    assert "pip install ./proto ./server" in installs
    assert "./client" not in installs and "./training" not in installs and "tensorflow" not in installs.lower()


def test_the_server_distribution_depends_on_no_training_or_client_and_decodes_through_the_contract():
    dependencies = tomllib.loads((ROOT / "server/pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower() for requirement in dependencies}
    assert "convserve-protocol" in names
    assert names.isdisjoint({"convserve-client", "convserve-training", "tensorflow", "tensorflow-cpu", "pillow"})
    # Pillow comes only with the contract's preprocessing (the "images" extra), to decode encoded_images.
    assert any(requirement.startswith("convserve-protocol[images]") for requirement in dependencies)
    extras = tomllib.loads((ROOT / "proto/pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(requirement.lower().startswith("pillow") for requirement in extras["images"])


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continued lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def server_image_pip_commands(tmp_path: Path, build_args: dict[str, str]) -> list[str]:
    """The pip commands the server Dockerfile's install step runs with ``build_args`` (run by sh, pip faked)."""
    instructions = dockerfile_instructions(ROOT / "server/Dockerfile")
    values = dict(arguments.split("=", 1) for keyword, arguments in instructions if keyword == "ARG")
    values.update(build_args)
    install = next(arguments for keyword, arguments in instructions if keyword == "RUN" and "pip install" in arguments)
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("pip", "useradd"):
        (tools / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/ran"\n')
        (tools / tool).chmod(0o755)
    done = subprocess.run(["/bin/sh", "-c", install], env={"PATH": f"{tools}:/usr/bin:/bin", **values}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return [line for line in (tmp_path / "ran").read_text().splitlines() if line.startswith("pip ")]


def server_build_args(*files: str) -> dict[str, str]:
    """The server's build args once the compose files are merged in order."""
    merged: dict[str, str] = {}
    for name in files:
        merged.update(load(name)["services"]["server"].get("build", {}).get("args", {}))
    return merged


@pytest.mark.parametrize("compose_files", [(), ("docker-compose.yml",)], ids=["docker build", "docker compose"])
def test_by_default_the_server_image_installs_the_gpu_extra_in_place_of_the_cpu_build(tmp_path, compose_files):
    pip = server_image_pip_commands(tmp_path, server_build_args(*compose_files))
    gpu = [i for i, command in enumerate(pip) if command.startswith("pip install") and "[gpu]" in command]
    removal = [i for i, command in enumerate(pip) if command.startswith("pip uninstall") and " onnxruntime" in command]
    assert len(gpu) == 1 and len(removal) == 1 and 0 < removal[0] < gpu[0], pip  # the CPU build goes, then the GPU one


def test_the_cpu_override_builds_the_server_image_without_cuda_wheels_under_its_own_tag(tmp_path):
    args = server_build_args("docker-compose.yml", "docker-compose.cpu.yml")
    assert args == {"GPU": "0"}
    pip = server_image_pip_commands(tmp_path, args)
    # the server's own requirements only, which bring ONNX Runtime's CPU build (tests/test_packaging.py)
    assert pip and all(command.startswith("pip install") for command in pip), pip
    assert not any(word in " ".join(pip) for word in ("[gpu]", "onnxruntime-gpu", "cuda", "nvidia")), pip
    base, cpu = (load(name)["services"]["server"]["image"] for name in ("docker-compose.yml", "docker-compose.cpu.yml"))
    assert cpu != base  # a CPU image never stands in for the GPU one, nor the other way round
