"""Typed results and settings of the client SDK."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from convserve_protocol.model_card import ModelCard
from convserve_protocol.preprocessing_spec import PreprocessingSpec


@dataclass(frozen=True)
class Prediction:
    """One label and its probability."""

    label: str
    score: float
    class_index: int


@dataclass(frozen=True)
class Classification:
    """The result for one image: its top-k labels, best first, and the model and version that gave them."""

    top_k: tuple[Prediction, ...]
    probabilities: np.ndarray | None = None
    """Every class probability in label order, when asked for."""
    model_name: str = ""
    """The model that produced this result (its name, also when the call named none)."""
    model_version: str = ""
    """The version of the model that produced this result."""

    @property
    def label(self) -> str:
        """The most likely label."""
        return self.top_k[0].label

    @property
    def score(self) -> float:
        """The most likely label's probability."""
        return self.top_k[0].score


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about the model it serves."""

    name: str
    version: str
    versions: tuple[str, ...]
    labels: tuple[str, ...]
    preprocessing: PreprocessingSpec
    max_batch_size: int
    execution_provider: str
    card: ModelCard
    verified: bool = False
    """The server ran the file's golden vectors on its provider and they matched (see docs/verification.md)."""
    verification_provider: str = ""
    """The provider the golden inputs ran on; empty for a file without them."""
    verification_worst_difference: float | None = None
    """The largest absolute probability difference the server measured; None for a file without golden vectors."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for UNAVAILABLE and RESOURCE_EXHAUSTED."""

    max_attempts: int = 5
    """Tries in all, the first included; 1 disables retries."""
    initial_backoff: float = 0.05
    """Upper bound of the first wait, in seconds."""
    max_backoff: float = 2.0
    """Upper bound of any wait, in seconds."""
    multiplier: float = 2.0
    """Growth of the bound from one wait to the next."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be an integer >= 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        bound = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return (rng or random).uniform(0.0, bound)
