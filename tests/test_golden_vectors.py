"""Golden vectors in a model card: encoding, decoding, and every malformed form refused with a ValueError."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from convserve_protocol.golden import GOLDEN_KEY, GoldenVectors
from convserve_protocol.model_card import ModelCard
from convserve_client.preprocessing import PreprocessingSpec


def golden(count: int = 8, size: int = 28, classes: int = 10, tolerance: float = 1e-4, seed: int = 0) -> GoldenVectors:
    rng = np.random.default_rng(seed)
    probabilities = rng.random((count, classes), dtype=np.float32)
    return GoldenVectors(rng.random((count, size, size, 3), dtype=np.float32),
                         probabilities / probabilities.sum(axis=1, keepdims=True), tolerance)


def card(vectors: GoldenVectors | None, size: int = 28, classes: int = 10) -> ModelCard:
    return ModelCard(model_name="m", model_version="1", labels=tuple(str(i) for i in range(classes)),
                     preprocessing=PreprocessingSpec(size, size), golden=vectors)


def test_a_card_round_trips_its_golden_vectors_exactly_through_the_metadata():
    vectors = golden(tolerance=2.5e-5)
    metadata = card(vectors).to_metadata()
    back = ModelCard.from_metadata(metadata).golden
    assert back is not None and back == vectors
    assert back.tolerance == 2.5e-5 and back.count == 8
    assert back.inputs.dtype == np.float32 and back.inputs.shape == (8, 28, 28, 3)
    assert ModelCard.from_json(card(vectors).to_json()).golden == vectors


def test_a_card_without_golden_vectors_stays_valid_and_writes_no_key():
    metadata = card(None).to_metadata()
    assert GOLDEN_KEY not in metadata
    assert ModelCard.from_metadata(metadata).golden is None


def test_eight_default_sized_images_of_real_looking_pixels_take_a_few_tens_of_kb():
    # Smooth images compress; this is the shape of the default model's vectors (digits upscaled to 28x28).
    ramp = np.linspace(0, 1, 28, dtype=np.float32)
    inputs = np.broadcast_to(ramp[None, :, None, None] * ramp[None, None, :, None], (8, 28, 28, 3)).copy()
    size = len(GoldenVectors(inputs, np.full((8, 10), 0.1, np.float32)).to_metadata()[GOLDEN_KEY])
    assert size < 64 * 1024


@pytest.mark.parametrize("change, message", [
    (lambda value: value.update(format=2), "unsupported format"),
    (lambda value: value.pop("probabilities"), "missing 'probabilities'"),
    (lambda value: value.update(inputs="!!not base64!!"), "malformed"),
    (lambda value: value.update(inputs_shape=[8, 28, 28, 4]), "do not fit the model's"),
    (lambda value: value.update(tolerance=-1), "tolerance must be a positive number"),
    (lambda value: value.update(probabilities_shape=[7, 10]), "do not fit the model's"),
])
def test_malformed_golden_vectors_are_a_value_error_naming_the_key(change, message):
    metadata = card(golden()).to_metadata()
    value = json.loads(metadata[GOLDEN_KEY])
    change(value)
    metadata[GOLDEN_KEY] = json.dumps(value)
    with pytest.raises(ValueError, match=message) as raised:
        ModelCard.from_metadata(metadata)
    assert GOLDEN_KEY in str(raised.value)


def test_golden_vectors_must_fit_the_cards_input_size_and_labels():
    with pytest.raises(ValueError, match="the model takes"):
        card(golden(size=16))
    with pytest.raises(ValueError, match="the model takes"):
        card(golden(classes=4))


@pytest.mark.parametrize("inputs, probabilities, tolerance", [
    (np.zeros((2, 4, 4)), np.zeros((2, 3)), 1e-4),
    (np.zeros((2, 4, 4, 3)), np.zeros((3, 3)), 1e-4),
    (np.zeros((0, 4, 4, 3)), np.zeros((0, 3)), 1e-4),
    (np.full((1, 4, 4, 3), np.nan), np.zeros((1, 3)), 1e-4),
    (np.zeros((1, 4, 4, 3)), np.zeros((1, 3)), 0.0),
    (np.zeros((1, 4, 4, 3)), np.zeros((1, 3)), math.inf),
])
def test_inconsistent_golden_vectors_are_refused(inputs, probabilities, tolerance):
    with pytest.raises(ValueError):
        GoldenVectors(inputs, probabilities, tolerance)


def test_worst_difference_is_the_largest_absolute_gap_and_infinite_when_outputs_cannot_be_compared():
    vectors = golden(count=2, classes=3)
    moved = vectors.probabilities.copy()
    moved[1, 2] -= 0.25
    moved[0, 0] += 0.125
    assert vectors.worst_difference(moved) == pytest.approx(0.25)
    assert vectors.worst_difference(vectors.probabilities) == 0.0
    assert vectors.worst_difference(moved[:, :2]) == math.inf
    moved[0, 1] = np.nan
    assert vectors.worst_difference(moved) == math.inf
