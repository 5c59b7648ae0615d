"""The Open Inference Protocol's inference request and response over HTTP: JSON tensors, flat or nested, and
Triton's binary tensor data extension (``Inference-Header-Content-Length``, ``binary_data_size``,
``binary_data_output``).  Nothing here knows the transport: bytes in, bytes out, domain errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from convserve_server.core import ServedVersion, element_count
from convserve_server.errors import InvalidInput, ModelNotFound, quoted
from convserve_server.servicers.tensors import checked_shape, fp32_from_bytes
from convserve_server.triton import BYTES, FP32, bytes_tensor, classifications

HEADER_LENGTH = "inference-header-content-length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
MAX_COUNT_DIGITS = 18
"""Most digits of a count read from a header or the query: more is no count a server could use (and Python
refuses to convert over 4,300 digits)."""


@dataclass(frozen=True)
class OutputForm:
    """How the caller wants the output: as raw bytes after the JSON (``binary``), and how many top classes
    Triton's classification parameter asks for (0: the probabilities as a tensor)."""

    binary: bool
    classes: int


def parse_json(data: bytes | memoryview, what: str) -> Any:
    """A JSON document; InvalidInput saying where it is malformed."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None


def whole_number(text: str) -> int | None:
    """``text`` as a non-negative integer if it is a short run of ASCII digits (``str.isdigit`` also accepts
    ``"²"``, which ``int`` refuses), else None."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_COUNT_DIGITS:
        return None
    return int(text)


def split_body(body: bytes, header_length: str | None) -> tuple[memoryview, memoryview]:
    """The JSON header and the binary section after it, as Triton's binary extension lays them out."""
    whole = memoryview(body)
    if header_length is None:
        return whole, whole[len(body):]
    length = whole_number(header_length)
    if length is None or length > len(body):
        raise InvalidInput(f"Inference-Header-Content-Length {quoted(header_length)} is not a byte count within the "
                           f"{len(body)}-byte body")
    return whole[:length], whole[length:]


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _parameters(holder: dict[str, Any], what: str) -> dict[str, Any]:
    return _object(holder.get("parameters") or {}, f"{what} parameters")


def request_object(header: memoryview) -> dict[str, Any]:
    """The inference request's JSON object."""
    return _object(parse_json(header, "the inference request"), "the inference request")


def deadline_of(request: dict[str, Any], received: float) -> float | None:
    """The deadline, a ``time.monotonic()`` instant, that Triton's ``timeout`` request parameter (microseconds
    from ``received``; what tritonclient.http's ``infer(timeout=...)`` sends) sets; None without one or for 0."""
    timeout = _parameters(request, "the request").get("timeout")
    if timeout is None or timeout == 0:
        return None
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
        raise InvalidInput(f"the timeout parameter must be a whole number of microseconds, got {timeout!r:.64}")
    return received + timeout / 1e6


def decode_input(request: dict[str, Any], binary: memoryview, served: ServedVersion) -> np.ndarray:
    """The request's one FP32 input as an (N, H, W, C) array, from JSON ``data`` or the binary section."""
    card = served.model.card
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        count = len(inputs) if isinstance(inputs, list) else "no list of"
        raise InvalidInput(f"model {served.name} takes exactly one input {quoted(card.input_name)}, got {count} inputs")
    tensor = _object(inputs[0], "inputs[0]")
    name = tensor.get("name")
    if name != card.input_name:
        raise InvalidInput(f"unknown input {quoted(str(name))}; model {served.name} takes {quoted(card.input_name)}")
    if tensor.get("datatype") != FP32:
        raise InvalidInput(f"input {quoted(name)} must be FP32, got {tensor.get('datatype') or 'no datatype'}")
    shape_value = tensor.get("shape")
    if not isinstance(shape_value, list) or not all(isinstance(dim, int) for dim in shape_value):
        raise InvalidInput(f"input {quoted(name)}: shape must be a list of integers, got {shape_value!r:.64}")
    shape = checked_shape(shape_value, f"input {quoted(name)}", rank=4)
    size = _parameters(tensor, f"input {quoted(name)}").get("binary_data_size")
    if size is not None:
        return _binary_input(size, binary, shape, name)
    if len(binary):
        raise InvalidInput(f"{len(binary)} bytes of binary data follow the JSON, but no input has binary_data_size")
    if "data" not in tensor:
        raise InvalidInput(f"input {quoted(name)} has neither data nor a binary_data_size parameter")
    return fp32_from_json(tensor["data"], shape, f"input {quoted(name)}")


def _binary_input(size: Any, binary: memoryview, shape: list[int], name: str) -> np.ndarray:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"input {quoted(name)}: binary_data_size must be a byte count, got {size!r:.64}")
    if size != len(binary):
        raise InvalidInput(f"input {quoted(name)}: binary_data_size is {size}, but {len(binary)} bytes follow the "
                           "JSON (set Inference-Header-Content-Length to the JSON's length)")
    return fp32_from_bytes(binary, shape, f"input {quoted(name)}")


def fp32_from_json(data: Any, shape: list[int], what: str) -> np.ndarray:
    """JSON numbers, flat or nested to the tensor's shape, as float32 of ``shape``; the count must match."""
    if not isinstance(data, list):
        raise InvalidInput(f"{what}: data must be a JSON array of numbers, got {type(data).__name__}")
    try:
        values = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{what}: data must be numbers, flat or nested as the shape is ({exc})") from None
    expected = element_count(shape)
    if values.size != expected:
        raise InvalidInput(f"{what}: {values.size} values do not match shape {shape} ({expected} values)")
    return values.reshape(shape)


def output_form(request: dict[str, Any], served: ServedVersion) -> OutputForm:
    """Check the requested outputs (as :mod:`convserve_server.servicers.inference` does over gRPC) and read how
    the output is wanted: binary or JSON, probabilities or top classes."""
    binary = _parameters(request, "the request").get("binary_data_output") is True
    classes = 0
    outputs = request.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidInput(f"outputs must be a JSON array, got {type(outputs).__name__}")
    for index, output in enumerate(outputs):
        output = _object(output, f"outputs[{index}]")
        name = str(output.get("name"))
        if name != served.model.card.output_name:
            raise ModelNotFound(f"unknown output {quoted(name)}; model {served.name} has "
                                f"{quoted(served.model.card.output_name)}")
        parameters = _parameters(output, f"output {quoted(name)}")
        binary = parameters.get("binary_data", binary) is True
        if "classification" in parameters:
            classes = _class_count(parameters["classification"], name, served)
    return OutputForm(binary, classes)


def _class_count(count: Any, name: str, served: ServedVersion) -> int:
    if not isinstance(count, int) or isinstance(count, bool):
        raise InvalidInput(f"output {quoted(name)}: the classification parameter must be an integer count, "
                           f"got {count!r:.64}")
    if count < 1:
        raise InvalidInput(f"output {quoted(name)}: the classification count must be at least 1, got {count}")
    return min(count, served.model.num_classes)


def encode_response(served: ServedVersion, request_id: Any, probabilities: np.ndarray,
                    form: OutputForm) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The inference response's body and its content headers: JSON, or JSON then the raw output."""
    name = served.model.card.output_name
    if form.classes:
        strings = classifications(probabilities, form.classes, served.model.card.labels)
        shape = [len(strings) // form.classes, form.classes]
        output: dict[str, Any] = {"name": name, "datatype": BYTES, "shape": shape}
        raw = bytes_tensor(strings) if form.binary else b""
        data: Any = [string.decode() for string in strings]
    else:
        output = {"name": name, "datatype": FP32, "shape": list(probabilities.shape)}
        raw = np.ascontiguousarray(probabilities, dtype="<f4").tobytes() if form.binary else b""
        data = probabilities.ravel()
    if form.binary:
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = data
    response = {"model_name": served.name, "model_version": str(served.version), "outputs": [output]}
    if request_id is not None:
        response["id"] = str(request_id)
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not form.binary:
        return header, [(b"content-type", JSON_TYPE.encode())]
    return header + raw, [(b"content-type", BINARY_TYPE.encode()), (HEADER_LENGTH.encode(), str(len(header)).encode())]
