"""What a model file says about itself: the contract between exporter, server and client.

The exporter writes a :class:`ModelCard` into the ONNX file's metadata
(``metadata_props``); the server reads it back and hands it to clients, so
labels, input size and preprocessing never travel as side files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from convserve_protocol.golden import GoldenVectors
from convserve_protocol.preprocessing_spec import PreprocessingSpec

_PREFIX = "convserve."


@dataclass(frozen=True)
class ModelCard:
    """Everything a server or client needs to know about one exported model."""

    model_name: str
    """Name of the model in the repository."""
    model_version: str
    """Version number in the repository, as a string."""
    labels: tuple[str, ...]
    """Class labels, in the order of the output's columns."""
    preprocessing: PreprocessingSpec
    """How raw images become model input (holds the input size)."""
    input_name: str = "image"
    """Name of the model's input tensor."""
    output_name: str = "probabilities"
    """Name of the model's output tensor."""
    trained_at: str = ""
    """ISO 8601 time the training finished."""
    dataset: str = ""
    """Name of the dataset the model was trained on."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Held-out test metrics, such as ``test_accuracy``."""
    golden: GoldenVectors | None = None
    """Inputs and the probabilities the model must give for them (see :mod:`convserve_protocol.golden`)."""

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError("a model card needs at least one label")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        if self.golden is not None:
            spec = self.preprocessing
            self.golden.check_fits((spec.height, spec.width, spec.channels), len(self.labels))

    def to_metadata(self) -> dict[str, str]:
        """The card as ONNX ``metadata_props`` (string keys and values)."""
        return {
            f"{_PREFIX}model_name": self.model_name,
            f"{_PREFIX}model_version": self.model_version,
            f"{_PREFIX}labels": json.dumps(list(self.labels)),
            f"{_PREFIX}input_height": str(self.preprocessing.height),
            f"{_PREFIX}input_width": str(self.preprocessing.width),
            f"{_PREFIX}preprocessing": self.preprocessing.to_json(),
            f"{_PREFIX}input_name": self.input_name,
            f"{_PREFIX}output_name": self.output_name,
            f"{_PREFIX}trained_at": self.trained_at,
            f"{_PREFIX}dataset": self.dataset,
            f"{_PREFIX}metrics": json.dumps(dict(self.metrics), sort_keys=True),
            **(self.golden.to_metadata() if self.golden is not None else {}),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> ModelCard:
        """Read a card back from ONNX metadata; ``ValueError`` names what is missing or wrong."""
        def get(key: str) -> str:
            try:
                return metadata[_PREFIX + key]
            except KeyError:
                raise ValueError(f"model metadata lacks {_PREFIX + key!r}") from None

        try:
            labels = json.loads(get("labels"))
            metrics: dict[str, Any] = json.loads(metadata.get(f"{_PREFIX}metrics", "{}"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"model metadata holds bad JSON: {exc}") from exc
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise ValueError("model metadata 'labels' must be a JSON list of strings")
        spec = PreprocessingSpec.from_json(get("preprocessing"))
        # The golden vectors' declared shapes are checked against the card's before anything is inflated.
        golden = GoldenVectors.from_metadata(metadata, (spec.height, spec.width, spec.channels), len(labels))
        return cls(
            model_name=get("model_name"),
            model_version=get("model_version"),
            labels=tuple(labels),
            preprocessing=spec,
            input_name=metadata.get(f"{_PREFIX}input_name", "image"),
            output_name=metadata.get(f"{_PREFIX}output_name", "probabilities"),
            trained_at=metadata.get(f"{_PREFIX}trained_at", ""),
            dataset=metadata.get(f"{_PREFIX}dataset", ""),
            metrics={str(k): float(v) for k, v in metrics.items()},
            golden=golden,
        )

    def to_json(self) -> str:
        """The card as one JSON object, as the server hands it to clients."""
        return json.dumps(self.to_metadata(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        """Inverse of :meth:`to_json`."""
        return cls.from_metadata(json.loads(text))
