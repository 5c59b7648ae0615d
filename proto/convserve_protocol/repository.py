"""The model repository's layout, defined once: ``<repository>/<name>/<version>/model.onnx``.

Model names are letters, digits, ``_``, ``-`` and ``.``, not starting with a
symbol; version folders have names of 1 to 18 ASCII digits (an int64, as in the
Open Inference Protocol).  Anything else, such as the
exporter's hidden ``.staging-*`` folders, is not part of the repository.  Names are matched whole:
``"shapes\n"`` is not a model name (``$`` would have matched before the newline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MODEL_FILENAME = "model.onnx"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True, order=True)
class VersionPath:
    """One model version on disk."""

    name: str
    version: int
    path: Path


def is_model_name(name: str) -> bool:
    """Whether ``name`` is usable as a model folder and in requests: the whole of it matches the rule."""
    return _MODEL_NAME.fullmatch(name) is not None


def folders_with_odd_names(repository: Path) -> list[str]:
    """Names of the repository's folders that are not model names and so are not served, hidden ones (such as
    the exporter's ``.staging-*``) left out: an operator should hear of ``"shapes\n"`` or ``"my model"``."""
    if not repository.is_dir():
        return []
    return sorted(child.name for child in repository.iterdir()
                  if not child.name.startswith(".") and not is_model_name(child.name) and child.is_dir())


MAX_VERSION_DIGITS = 18


def is_version_name(name: str) -> bool:
    """Whether a folder name (or a requested version) is a version number.

    ASCII digits only: ``str.isdigit`` also takes "²" or "٣", which ``int`` then refuses.
    """
    return 0 < len(name) <= MAX_VERSION_DIGITS and name.isascii() and name.isdigit()


def version_numbers(model_dir: Path) -> list[int]:
    """Numbers of the version folders of one model, with or without a model file yet, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(child.name) for child in model_dir.iterdir() if child.is_dir() and is_version_name(child.name))


def model_versions(model_dir: Path, repository: Path | None = None) -> list[VersionPath]:
    """Versions of one model that hold a model file, ascending; with ``repository``, only those whose folder
    and file stay inside it."""
    found = []
    for number in version_numbers(model_dir):
        path = model_dir / str(number) / MODEL_FILENAME
        if path.is_file() and (repository is None or stays_inside(path, repository)):
            found.append(VersionPath(model_dir.name, number, path))
    return found


def scan_repository(repository: Path) -> dict[str, list[VersionPath]]:
    """Every model with at least one version, by name; versions ascending; links out of the repository ignored."""
    if not repository.is_dir():
        return {}
    found = {}
    for model_dir in sorted(repository.iterdir()):
        if model_dir.is_dir() and is_model_name(model_dir.name) and stays_inside(model_dir, repository):
            versions = model_versions(model_dir, repository)
            if versions:
                found[model_dir.name] = versions
    return found


def stays_inside(path: Path, repository: Path) -> bool:
    """Whether ``path``, its links followed, is inside ``repository``."""
    return path.resolve().is_relative_to(repository.resolve())


def links_out_of(repository: Path) -> list[Path]:
    """Model folders, version folders and model files that are links leading out of the repository (ignored)."""
    if not repository.is_dir():
        return []
    candidates = [model_dir for model_dir in repository.iterdir() if is_model_name(model_dir.name)]
    for model_dir in [path for path in candidates if path.is_dir() and stays_inside(path, repository)]:
        for number in version_numbers(model_dir):
            candidates += [model_dir / str(number), model_dir / str(number) / MODEL_FILENAME]
    return sorted(path for path in candidates if path.exists() and not stays_inside(path, repository))
