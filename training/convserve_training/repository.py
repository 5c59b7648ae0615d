"""Writing into a model repository laid out as ``<repository>/<name>/<version>/model.onnx``.

A version is first built in a hidden staging folder beside the versions and
then renamed into place in one step, so a watcher never sees a half-written
version, and an existing version is never overwritten.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from convserve_training.errors import TrainingError

MODEL_FILENAME = "model.onnx"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class StagedVersion:
    """A version being written: files go into ``staging``; they become ``final`` on commit."""

    version: int
    staging: Path
    final: Path


def existing_versions(model_dir: Path) -> list[int]:
    """Version numbers already in a model's folder, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def newest_model_file(model_dir: Path) -> Path | None:
    """The model file of the newest version that holds one, or None.

    Only all-digit version folders count: a leftover ``.staging-*`` folder
    from an interrupted run is not a version, even with a model file in it.
    """
    for version in reversed(existing_versions(model_dir)):
        path = model_dir / str(version) / MODEL_FILENAME
        if path.is_file():
            return path
    return None


def check_model_name(name: str) -> str:
    """A model name usable as a folder name and in gRPC requests, or TrainingError."""
    if not _MODEL_NAME.match(name):
        raise TrainingError(f"model name {name!r} must be letters, digits, '_', '-' or '.', not starting with a symbol")
    return name


@contextmanager
def stage_next_version(repository: Path, model_name: str) -> Iterator[StagedVersion]:
    """Stage the next version of a model; it appears on normal exit, and nothing is left on error."""
    model_dir = repository / check_model_name(model_name)
    model_dir.mkdir(parents=True, exist_ok=True)
    versions = existing_versions(model_dir)
    version = versions[-1] + 1 if versions else 1
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        yield StagedVersion(version, staging, model_dir / str(version))
        final = model_dir / str(version)
        if final.exists():
            raise TrainingError(f"{final} appeared while training; not overwriting it")
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
