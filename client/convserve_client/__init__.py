"""convserve's Python client SDK: images in, labels out.

>>> from convserve_client import Client
>>> with Client("localhost:8500") as client:
...     print(client.classify(["cat.jpg"], top_k=3)[0].label)
"""

from __future__ import annotations

from convserve_client.aio import AsyncClient
from convserve_client.client import Client
from convserve_client.errors import (
    AuthenticationError,
    ConvserveError,
    DeadlineExceededError,
    ImageError,
    InvalidArgumentError,
    MessageTooLargeError,
    NotFoundError,
    OverloadedError,
    ServerError,
    UnavailableError,
)
from convserve_protocol.model_card import ModelCard
from convserve_client.preprocessing import preprocess, preprocess_batch
from convserve_protocol.preprocessing_spec import PreprocessingSpec
from convserve_client.types import Classification, ModelInfo, Prediction, RetryPolicy

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "Classification",
    "Client",
    "ConvserveError",
    "DeadlineExceededError",
    "ImageError",
    "InvalidArgumentError",
    "MessageTooLargeError",
    "ModelCard",
    "ModelInfo",
    "NotFoundError",
    "OverloadedError",
    "Prediction",
    "PreprocessingSpec",
    "RetryPolicy",
    "ServerError",
    "UnavailableError",
    "preprocess",
    "preprocess_batch",
]
