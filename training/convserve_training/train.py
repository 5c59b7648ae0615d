"""The training run, top to bottom: data, model, fit, evaluate, export, write."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from convserve_client.golden import DEFAULT_TOLERANCE, GoldenVectors
from convserve_client.model_card import ModelCard
from convserve_client.preprocessing import PreprocessingSpec
from convserve_training import export, report
from convserve_training.data import Dataset, load_digits_dataset, load_image_folder, split_dataset
from convserve_training.golden import DEFAULT_COUNT, select_covering
from convserve_training.model import build_model
from convserve_training.repository import MODEL_FILENAME, stage_next_version

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "digits"
REPORT_DIR = "report"


@dataclass(frozen=True)
class TrainingConfig:
    """Everything one training run needs; the command line fills it."""

    model_repository: Path = Path("models")
    """Repository to write ``<name>/<version>/model.onnx`` into."""
    model_name: str = ""
    """Model name; empty means "digits" for the bundled data, else the data folder's name."""
    data_dir: Path | None = None
    """One sub-folder per class; None means scikit-learn's bundled digits."""
    height: int = 28
    """Model input height."""
    width: int = 28
    """Model input width."""
    epochs: int = 30
    """Passes over the training split."""
    batch_size: int = 32
    """Images per training step."""
    learning_rate: float = 1e-3
    """Adam's learning rate."""
    validation_fraction: float = 0.1
    """Share of the data held out for validation curves."""
    test_fraction: float = 0.2
    """Share of the data held out for the final test metrics."""
    seed: int = 42
    """Seed of the split, the weights and the shuffling."""
    opset: int = export.DEFAULT_OPSET
    """ONNX opset to export with."""
    min_images_per_class: int = 5
    """Fewest readable images a class folder may have."""
    golden_count: int = DEFAULT_COUNT
    """Held-out test images recorded in the card as golden vectors, covering several classes (0: none)."""
    golden_tolerance: float = DEFAULT_TOLERANCE
    """Largest absolute probability difference a server accepts on the golden vectors."""
    verbose: int = 2
    """Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch."""

    def resolved_model_name(self) -> str:
        """The model name to write under."""
        if self.model_name:
            return self.model_name
        return self.data_dir.resolve().name if self.data_dir else DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class TrainingResult:
    """What a run produced."""

    model_path: Path
    version: int
    card: ModelCard
    metrics: dict[str, float]


def _load_dataset(config: TrainingConfig, spec: PreprocessingSpec) -> Dataset:
    if config.data_dir is None:
        return load_digits_dataset(spec)
    return load_image_folder(config.data_dir, spec, config.min_images_per_class)


def _one_hot(targets: np.ndarray, num_classes: int) -> np.ndarray:
    return keras.utils.to_categorical(targets, num_classes)


def _golden_vectors(config: TrainingConfig, test: Dataset, keras_probabilities: np.ndarray) -> GoldenVectors | None:
    """A few held-out images covering several classes, with the Keras probabilities the exported file must give."""
    if config.golden_count == 0:
        return None
    chosen = select_covering(test.targets, config.golden_count)
    return GoldenVectors(test.images[chosen], keras_probabilities[chosen], config.golden_tolerance)


def run_training(config: TrainingConfig, print_fn: Callable[[str], None] = print) -> TrainingResult:
    """Train, evaluate, export and write one new model version; raises TrainingError on bad input."""
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    model_name = config.resolved_model_name()
    spec = PreprocessingSpec(height=config.height, width=config.width)

    # Data: the same preprocessing as the client, then a stratified split.
    dataset = _load_dataset(config, spec)
    splits = split_dataset(dataset, config.validation_fraction, config.test_fraction, config.seed)
    num_classes = len(dataset.labels)
    print_fn(f"dataset {dataset.name}: {len(dataset.targets)} images, {num_classes} classes "
             f"(train {len(splits.train.targets)}, validation {len(splits.validation.targets)}, "
             f"test {len(splits.test.targets)})")

    # Model and training.
    model = build_model((spec.height, spec.width, spec.channels), num_classes, config.learning_rate)
    model.summary(print_fn=print_fn)
    started = time.monotonic()
    history = model.fit(
        splits.train.images,
        _one_hot(splits.train.targets, num_classes),
        batch_size=config.batch_size,
        epochs=config.epochs,
        validation_data=(splits.validation.images, _one_hot(splits.validation.targets, num_classes)),
        verbose=config.verbose,
    )
    train_seconds = time.monotonic() - started

    # Held-out evaluation.
    test_loss, test_accuracy = model.evaluate(
        splits.test.images, _one_hot(splits.test.targets, num_classes), verbose=0
    )
    keras_probabilities = model.predict(splits.test.images, verbose=0)
    matrix = report.confusion_matrix(splits.test.targets, keras_probabilities.argmax(axis=1), num_classes)
    metrics = {
        "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss),
        "validation_accuracy": float(history.history["val_accuracy"][-1]),
        "train_seconds": round(train_seconds, 2),
        "test_images": float(len(splits.test.targets)),
    }
    print_fn(f"test accuracy {test_accuracy:.4f} after {train_seconds:.1f} s of training")

    # Export, check, and write the new version in one step.
    with stage_next_version(config.model_repository, model_name) as staged:
        card = ModelCard(
            model_name=model_name,
            model_version=str(staged.version),
            labels=dataset.labels,
            preprocessing=spec,
            trained_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            dataset=dataset.name,
            metrics=metrics,
            golden=_golden_vectors(config, splits.test, keras_probabilities),
        )
        model_bytes = export.convert_to_onnx(model, card, config.opset).SerializeToString()
        metrics["parity_max_abs_diff"] = export.check_parity(keras_probabilities, model_bytes, splits.test.images)
        if card.golden is not None:
            export.check_golden(card.golden, model_bytes)
        (staged.staging / MODEL_FILENAME).write_bytes(model_bytes)
        report.write_report(
            staged.staging / REPORT_DIR, history.history, matrix, dataset.labels,
            {**metrics, "labels": list(dataset.labels), "model_name": model_name, "version": staged.version},
        )
    model_path = staged.final / MODEL_FILENAME
    print_fn(f"wrote {model_path}")
    return TrainingResult(model_path, staged.version, card, metrics)
