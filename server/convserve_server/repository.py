"""Reading a model repository laid out as ``<repository>/<name>/<version>/model.onnx``.

Version folders have all-digit names; anything else (such as the
exporter's hidden staging folders) is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODEL_FILENAME = "model.onnx"


@dataclass(frozen=True, order=True)
class VersionPath:
    """One model version on disk."""

    name: str
    version: int
    path: Path


def model_versions(model_dir: Path) -> list[VersionPath]:
    """Versions of one model that hold a model file, ascending."""
    versions = [
        VersionPath(model_dir.name, int(child.name), child / MODEL_FILENAME)
        for child in model_dir.iterdir()
        if child.is_dir() and child.name.isdigit() and (child / MODEL_FILENAME).is_file()
    ]
    return sorted(versions)


def scan_repository(repository: Path) -> dict[str, list[VersionPath]]:
    """Every model with at least one version, by name; versions ascending."""
    if not repository.is_dir():
        return {}
    found = {}
    for model_dir in sorted(repository.iterdir()):
        if model_dir.is_dir() and not model_dir.name.startswith("."):
            versions = model_versions(model_dir)
            if versions:
                found[model_dir.name] = versions
    return found
