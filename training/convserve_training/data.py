"""Datasets for training: scikit-learn's bundled digits, or a folder of labelled images.

Every image goes through :func:`convserve_client.preprocessing.preprocess`,
the very function the client SDK applies at serving time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from convserve_client.errors import ImageError
from convserve_client.preprocessing import preprocess
from convserve_protocol.preprocessing_spec import PreprocessingSpec

MAX_TRAINING_FILE_BYTES = 256 * 1024 * 1024
"""Largest image file read for training: the operator's own folder, so well above the SDK's 16 MiB request cap
(the pixel limit still bounds what a file decodes to)."""
from convserve_training.errors import TrainingError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
"""File name endings read from a data folder (case-insensitive)."""

DIGITS_MAX_VALUE = 16
"""scikit-learn's digits hold integer intensities 0..16."""


@dataclass(frozen=True)
class Dataset:
    """Preprocessed images with integer class indices into ``labels``."""

    name: str
    images: np.ndarray
    targets: np.ndarray
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Splits:
    """A stratified train/validation/test split of one dataset."""

    train: Dataset
    validation: Dataset
    test: Dataset


def digits_as_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8×8 digits as ordinary 0..255 grayscale images, and their targets."""
    digits = load_digits()
    images = np.round(digits.images * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def load_digits_dataset(spec: PreprocessingSpec) -> Dataset:
    """The bundled digits, labels "0" to "9", preprocessed as the client will."""
    images, targets = digits_as_uint8()
    batch = np.stack([preprocess(image, spec) for image in images])
    return Dataset("sklearn-digits", batch, targets, tuple(str(digit) for digit in range(10)))


def _class_folders(data_dir: Path) -> list[Path]:
    if not data_dir.is_dir():
        raise TrainingError(f"--data-dir {data_dir}: no such directory")
    folders = sorted(path for path in data_dir.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not folders:
        raise TrainingError(f"--data-dir {data_dir}: no class folders in it")
    if len(folders) < 2:
        raise TrainingError(f"--data-dir {data_dir}: only one class ({folders[0].name}); need at least 2")
    return folders


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrainingError(f"class folder {folder} has no JPEG or PNG images")
    return files


def load_image_folder(data_dir: Path, spec: PreprocessingSpec, min_per_class: int) -> Dataset:
    """One sub-folder per class, labels in sorted order; unreadable files are skipped and counted."""
    folders = _class_folders(data_dir)
    images: list[np.ndarray] = []
    targets: list[int] = []
    skipped: list[str] = []
    for index, folder in enumerate(folders):
        kept = 0
        for path in _image_files(folder):
            try:
                images.append(preprocess(path, spec, max_bytes=MAX_TRAINING_FILE_BYTES))
            except ImageError as exc:
                skipped.append(str(exc))
                continue
            targets.append(index)
            kept += 1
        if kept < min_per_class:
            raise TrainingError(
                f"class {folder.name!r} has {kept} readable images; at least {min_per_class} are needed"
            )
    if skipped:
        log.warning("skipped %d unreadable image(s), first: %s", len(skipped), skipped[0])
    return Dataset(data_dir.name, np.stack(images), np.asarray(targets, dtype=np.int64), tuple(f.name for f in folders))


def _subset(dataset: Dataset, indices: np.ndarray) -> Dataset:
    return Dataset(dataset.name, dataset.images[indices], dataset.targets[indices], dataset.labels)


def split_dataset(dataset: Dataset, validation_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Stratified train/validation/test split, the same for the same seed."""
    indices = np.arange(len(dataset.targets))
    try:
        rest, test = train_test_split(
            indices, test_size=test_fraction, stratify=dataset.targets, random_state=seed
        )
        train, validation = train_test_split(
            rest,
            test_size=validation_fraction / (1.0 - test_fraction),
            stratify=dataset.targets[rest],
            random_state=seed,
        )
    except ValueError as exc:
        raise TrainingError(f"cannot split the data set: {exc}") from exc
    return Splits(_subset(dataset, train), _subset(dataset, validation), _subset(dataset, test))
