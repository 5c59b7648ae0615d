"""The one training configuration; ``convserve-train``'s flags are generated from it.

This module must not import TensorFlow: the command line builds its parser,
reports argument errors and answers ``--skip-if-present`` from here alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from convserve_protocol.golden import DEFAULT_COUNT, DEFAULT_TOLERANCE
from convserve_protocol.preprocessing_spec import CROP_MODES

DEFAULT_MODEL_NAME = "digits"
"""Model name for the bundled digits."""
DEFAULT_OPSET = 17
"""Oldest ONNX opset the exporter writes."""
VERBOSITY_LEVELS = (0, 1, 2)
"""Keras progress output levels."""


def _flag(help_text: str, **extra: object) -> dict[str, object]:
    """Field metadata read by the command line: the flag's help and, optionally, its ``choices``."""
    return {"help": help_text, **extra}


@dataclass(frozen=True)
class TrainingConfig:
    """Everything one training run needs; each field is also a ``convserve-train`` flag.

    Raises ``ValueError`` naming the field when a value is out of range.
    """

    data_dir: Path | None = field(default=None, metadata=_flag(
        "folder with one sub-folder of JPEG/PNG images per class; unset: scikit-learn's bundled digits"))
    model_repository: Path = field(default=Path("models"), metadata=_flag(
        "model repository to write <name>/<version>/model.onnx into"))
    model_name: str = field(default="", metadata=_flag(
        f"model name; empty: '{DEFAULT_MODEL_NAME}' for the bundled digits, else the --data-dir folder's name"))
    height: int = field(default=28, metadata=_flag("model input height in pixels"))
    width: int = field(default=28, metadata=_flag("model input width in pixels"))
    crop: str = field(default="center_to_aspect_ratio", metadata=_flag(
        "how images are fitted to the input size: center_to_aspect_ratio (Keras Resizing with "
        "crop_to_aspect_ratio=True) or center (Keras CenterCrop); the model card records it",
        choices=CROP_MODES))
    epochs: int = field(default=30, metadata=_flag("passes over the training split"))
    batch_size: int = field(default=32, metadata=_flag("images per training step"))
    learning_rate: float = field(default=1e-3, metadata=_flag("Adam's learning rate"))
    validation_fraction: float = field(default=0.1, metadata=_flag(
        "share of the data held out for validation curves"))
    test_fraction: float = field(default=0.2, metadata=_flag("share of the data held out for the final test metrics"))
    seed: int = field(default=42, metadata=_flag("seed of the split, the weights and the shuffling"))
    opset: int = field(default=DEFAULT_OPSET, metadata=_flag("ONNX opset to export with"))
    min_images_per_class: int = field(default=5, metadata=_flag("fewest readable images a class folder may have"))
    min_test_accuracy: float = field(default=0.0, metadata=_flag(
        "fail, writing no version, when the test accuracy is below this (0 to 1; 0: no bar)"))
    golden_count: int = field(default=DEFAULT_COUNT, metadata=_flag(
        "held-out test images recorded in the model file as golden vectors, covering several classes (0: none)"))
    golden_tolerance: float = field(default=DEFAULT_TOLERANCE, metadata=_flag(
        "largest absolute probability difference a server accepts on the golden vectors"))
    verbose: int = field(default=2, metadata=_flag(
        "Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch", choices=VERBOSITY_LEVELS))

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ValueError(problem)

    def _problem(self) -> str | None:
        if self.height < 10 or self.width < 10:  # 8 would leave the second pooling a 1x1 input
            return "height and width must be at least 10 (two 3x3 convolutions and two poolings)"
        if self.crop not in CROP_MODES:
            return f"crop must be one of {', '.join(CROP_MODES)}, not {self.crop!r}"
        if self.epochs < 1 or self.batch_size < 1:
            return "epochs and batch_size must be >= 1"
        if not (0 < self.validation_fraction < 1 and 0 < self.test_fraction < 1
                and self.validation_fraction + self.test_fraction < 1):
            return "validation_fraction and test_fraction must be in (0, 1) and sum to less than 1"
        if self.opset < DEFAULT_OPSET:
            return f"opset must be {DEFAULT_OPSET} or newer"
        if self.min_images_per_class < 1:
            return "min_images_per_class must be >= 1"
        if not 0 <= self.min_test_accuracy <= 1:
            return "min_test_accuracy must be between 0 and 1"
        if self.golden_count < 0 or not 0 < self.golden_tolerance < float("inf"):
            return "golden_count must be >= 0 and golden_tolerance positive and finite"
        if self.verbose not in VERBOSITY_LEVELS:
            return f"verbose must be one of {VERBOSITY_LEVELS}"
        return None

    def resolved_model_name(self) -> str:
        """The model name to write under."""
        if self.model_name:
            return self.model_name
        return self.data_dir.resolve().name if self.data_dir else DEFAULT_MODEL_NAME
