"""The HTTP/REST inference requests the benchmark sends, and the check of their answers.

Two encodings of the Open Inference Protocol's REST ``infer``: JSON tensors (the images as a flat list of
numbers) and Triton's binary tensor data extension (a JSON header, then the images' raw little-endian bytes,
its length in ``Inference-Header-Content-Length``; the answer asked for as raw bytes too, with
``binary_data_output``). A request is built once, as bytes, and sent again and again, as the gRPC load
generator does with its protobuf message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson

from convserve_bench.rpc import FP32, ServedModel

BINARY = "binary"
JSON = "json"
HEADER_LENGTH = "Inference-Header-Content-Length"
FP32_BYTES = 4


@dataclass(frozen=True)
class RestInfer:
    """One ``POST /v2/models/{name}/infer`` request, ready to send, and the answer's size it expects."""

    path: str
    body: bytes
    headers: Mapping[str, str]
    encoding: str
    """:data:`BINARY` or :data:`JSON`."""
    answer_shape: tuple[int, int]
    """(images, classes): the one FP32 output a right answer carries."""

    def answered_right(self, headers: Mapping[str, str], body: bytes) -> bool:
        """Whether a 200 answer's ``headers`` and ``body`` carry one output of :attr:`answer_shape`."""
        try:
            return self._binary_answer_right(headers, body) if self.encoding == BINARY else self._json_answer_right(body)
        except (ValueError, KeyError, TypeError, IndexError):  # not JSON, or not the answer's layout
            return False

    def _binary_answer_right(self, headers: Mapping[str, str], body: bytes) -> bool:
        header_length = int(headers[HEADER_LENGTH])
        [output] = orjson.loads(body[:header_length])["outputs"]
        size = FP32_BYTES * self.answer_shape[0] * self.answer_shape[1]
        return (output["shape"] == list(self.answer_shape) and output["parameters"]["binary_data_size"] == size
                and len(body) - header_length == size)

    def _json_answer_right(self, body: bytes) -> bool:
        [output] = orjson.loads(body)["outputs"]
        return output["shape"] == list(self.answer_shape) and len(output["data"]) == self.answer_shape[0] * self.answer_shape[1]


def infer_request(encoding: str, model: ServedModel, images: np.ndarray) -> RestInfer:
    """The REST ``infer`` request carrying ``images`` (N, H, W, C) to ``model`` in ``encoding``."""
    tensor: dict[str, Any] = {"name": model.input_name, "shape": list(images.shape), "datatype": FP32}
    raw = np.ascontiguousarray(images, dtype="<f4")
    if encoding == JSON:
        body = orjson.dumps({"inputs": [{**tensor, "data": raw.ravel()}]}, option=orjson.OPT_SERIALIZE_NUMPY)
        headers = {"Content-Type": "application/json"}
    elif encoding == BINARY:
        header = orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": raw.nbytes}}],
                               "parameters": {"binary_data_output": True}})
        body = header + raw.tobytes()
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    else:
        raise ValueError(f"encoding must be {BINARY!r} or {JSON!r}, not {encoding!r}")
    return RestInfer(path=f"/v2/models/{quote(model.name, safe='')}/infer", body=body, headers=headers,
                     encoding=encoding, answer_shape=(len(images), model.classes))
