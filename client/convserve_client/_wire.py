"""Conversions between the SDK's types and the Classifier API's messages, shared by both clients."""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
from PIL import Image

from convserve_client.errors import ConvserveError
from convserve_protocol.model_card import ModelCard
from convserve_client.preprocessing import ImageInput
from convserve_protocol.preprocessing_spec import PreprocessingSpec
from convserve_protocol.protos import classifier_pb2
from convserve_client.types import Classification, ModelInfo, Prediction


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """A single image as a one-item list; a sequence (or an N×H×W×C array) as a list of images."""
    if isinstance(images, np.ndarray):
        return [images] if images.ndim in (2, 3) else list(images)
    if isinstance(images, (str, bytes, bytearray, memoryview, Image.Image, os.PathLike)):
        return [images]
    return list(images)


def chunk_bounds(rows: int, max_rows: int) -> list[tuple[int, int]]:
    """Split ``rows`` into consecutive [start, stop) ranges of at most ``max_rows``."""
    if max_rows < 1:
        raise ValueError("max_rows must be >= 1")
    return [(start, min(start + max_rows, rows)) for start in range(0, rows, max_rows)]


def rows_per_request(info: ModelInfo, max_request_bytes: int) -> int:
    """Images per request: the server's maximum batch, and no more than fits in one message."""
    spec = info.preprocessing
    image_bytes = spec.height * spec.width * spec.channels * 4
    return max(1, min(info.max_batch_size, max_request_bytes // image_bytes))


def classify_request(
    batch: np.ndarray, model_name: str, model_version: str, top_k: int, include_probabilities: bool
) -> classifier_pb2.ClassifyRequest:
    """A ClassifyRequest carrying ``batch`` as raw little-endian float32."""
    data = np.ascontiguousarray(batch, dtype="<f4")
    return classifier_pb2.ClassifyRequest(
        model_name=model_name,
        model_version=model_version,
        images=data.tobytes(),
        shape=list(data.shape),
        top_k=top_k,
        include_probabilities=include_probabilities,
    )


def encoded_classify_request(
    encoded: Sequence[bytes], model_name: str, model_version: str, top_k: int, include_probabilities: bool
) -> classifier_pb2.ClassifyRequest:
    """A ClassifyRequest carrying encoded image files for the server to decode and preprocess."""
    return classifier_pb2.ClassifyRequest(
        model_name=model_name,
        model_version=model_version,
        encoded_images=list(encoded),
        top_k=top_k,
        include_probabilities=include_probabilities,
    )


def pack_by_size(sizes: Sequence[int], max_items: int, max_total: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of at most ``max_items`` items and ``max_total`` summed size
    (an item bigger than ``max_total`` alone in its range)."""
    bounds: list[tuple[int, int]] = []
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start >= max_items or total + size > max_total):
            bounds.append((start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        bounds.append((start, len(sizes)))
    return bounds


_ENCODED_IMAGE_ERROR = re.compile(r"^encoded_images\[(\d+)\]: (.*)$", re.DOTALL)
_SHAPE_ERROR_START = "images must have shape"
_MODEL_INPUT_LIMIT = re.compile(r"over the ([\d,]+) a tensor request may carry")


def model_input_limit(message: str) -> int | None:
    """The bytes of model input a server takes in one request, when its INVALID_ARGUMENT message says
    that too many encoded images were sent at once."""
    match = _MODEL_INPUT_LIMIT.search(message)
    return int(match.group(1).replace(",", "")) if match else None


def bad_encoded_image(message: str) -> tuple[int, str] | None:
    """The position and reason of the encoded image a server's INVALID_ARGUMENT message blames, if it blames one."""
    match = _ENCODED_IMAGE_ERROR.match(message)
    return (int(match.group(1)), match.group(2)) if match else None


def is_wrong_shape(message: str) -> bool:
    """Whether a server's INVALID_ARGUMENT message says the images' shape is not the model's input shape."""
    return message.startswith(_SHAPE_ERROR_START)


def parse_classify_response(response: classifier_pb2.ClassifyResponse, expected: int) -> list[Classification]:
    """The typed results of one response, each naming the model and version that answered; checks it answers
    every image sent."""
    if len(response.results) != expected:
        raise ConvserveError(f"server answered {len(response.results)} results for {expected} images")
    return [
        Classification(
            top_k=tuple(Prediction(p.label, p.score, p.class_index) for p in result.top_k),
            probabilities=np.asarray(result.probabilities, dtype=np.float32) if result.probabilities else None,
            model_name=response.model_name,
            model_version=response.model_version,
        )
        for result in response.results
    ]


def parse_model_info(message: classifier_pb2.ModelInfo) -> ModelInfo:
    """The typed form of a ModelInfo message."""
    card = ModelCard.from_json(message.model_card_json)
    return ModelInfo(
        name=message.name,
        version=message.version,
        versions=tuple(message.versions),
        labels=tuple(message.labels),
        preprocessing=PreprocessingSpec.from_json(message.preprocessing_json),
        max_batch_size=message.max_batch_size,
        execution_provider=message.execution_provider,
        card=card,
        verified=message.verified,
        verification_provider=message.verification_provider,
        verification_worst_difference=(message.verification_worst_difference
                                       if message.HasField("verification_worst_difference") else None),
    )


def check_top_k(top_k: int, labels: int) -> None:
    """Refuse a top_k the model cannot answer before anything is sent."""
    if not 1 <= top_k <= labels:
        raise ValueError(f"top_k must be between 1 and {labels}, got {top_k}")


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a bearer token, if one is set."""
    return (("authorization", f"Bearer {token}"),) if token else ()
