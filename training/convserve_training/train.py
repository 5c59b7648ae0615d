"""The training run, top to bottom: data, model, fit, evaluate, export, write."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from convserve_training.tf_logging import import_tensorflow

import_tensorflow()  # first, with the log level set, so that its import-time lines are filtered

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from convserve_protocol.golden import GoldenVectors  # noqa: E402
from convserve_protocol.model_card import ModelCard  # noqa: E402
from convserve_protocol.preprocessing_spec import PreprocessingSpec  # noqa: E402
from convserve_training import export, report  # noqa: E402
from convserve_training.config import TrainingConfig  # noqa: E402
from convserve_training.data import Dataset, load_digits_dataset, load_image_folder, split_dataset  # noqa: E402
from convserve_training.errors import TrainingError  # noqa: E402
from convserve_training.golden import select_covering  # noqa: E402
from convserve_training.model import build_model  # noqa: E402
from convserve_protocol.repository import MODEL_FILENAME  # noqa: E402
from convserve_training.repository import stage_next_version  # noqa: E402

log = logging.getLogger(__name__)

REPORT_DIR = "report"
SMALL_TEST_SPLIT = 50
"""Fewer test images than this make the test accuracy too rough to trust: the run warns."""


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


def _warn_if_small(test_split: Dataset) -> None:
    count = len(test_split.targets)
    if count < SMALL_TEST_SPLIT:
        log.warning("the test split has only %d images (under %d): its accuracy is a rough estimate; "
                    "more data or a larger --test-fraction makes it trustworthy", count, SMALL_TEST_SPLIT)


def _check_test_accuracy(accuracy: float, test_images: int, minimum: float) -> None:
    """TrainingError when the model misses the bar; called before anything is written."""
    if accuracy < minimum:
        raise TrainingError(f"test accuracy {accuracy:.4f} on {test_images} images is below --min-test-accuracy "
                            f"{minimum:g}; no version written")


def _golden_vectors(config: TrainingConfig, test: Dataset, keras_probabilities: np.ndarray) -> GoldenVectors | None:
    """A few held-out images covering several classes, with the Keras probabilities the exported file must give."""
    if config.golden_count == 0:
        return None
    chosen = select_covering(test.targets, config.golden_count)
    return GoldenVectors(test.images[chosen], keras_probabilities[chosen], config.golden_tolerance)


def run_training(config: TrainingConfig, print_fn: Callable[[str], None] = print) -> TrainingResult:
    """Train, evaluate, export and write one new model version.

    Raises TrainingError on bad input, and when the test accuracy is below ``config.min_test_accuracy`` (checked
    before anything is written, so the repository is left as it was).
    """
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    model_name = config.resolved_model_name()
    spec = PreprocessingSpec(height=config.height, width=config.width, crop=config.crop)

    # Data: the same preprocessing as the client, then a stratified split.
    dataset = _load_dataset(config, spec)
    splits = split_dataset(dataset, config.validation_fraction, config.test_fraction, config.seed)
    num_classes = len(dataset.labels)
    print_fn(f"dataset {dataset.name}: {len(dataset.targets)} images, {num_classes} classes "
             f"(train {len(splits.train.targets)}, validation {len(splits.validation.targets)}, "
             f"test {len(splits.test.targets)})")
    _warn_if_small(splits.test)

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
    _check_test_accuracy(float(test_accuracy), len(splits.test.targets), config.min_test_accuracy)

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
