"""docker-compose.yml's structure, parsed (no Docker engine runs here)."""

from __future__ import annotations

import re
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
