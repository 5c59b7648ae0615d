"""``POST /v2/models/{name}[/versions/{v}]/classify``: image files in, labels out.

The images come as ``multipart/form-data`` files (``curl -F image=@cat.png``; several files, several
answers, in order) or as one raw body with an ``image/*`` (or ``application/octet-stream``) content type.
They are decoded and preprocessed on the server by the contract's code, under the limits of gRPC's
``encoded_images`` (:class:`~convserve_server.images.ImageDecoder`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from convserve_server.core import InferenceCore
from convserve_server.errors import InvalidInput, quoted
from convserve_server.http.errors import UNSUPPORTED_MEDIA, HttpError
from convserve_server.http.messages import Call, Reply, json_reply, off_loop_if_large
from convserve_server.http.oip import verification_parameters
from convserve_server.http.tensors import MAX_COUNT_DIGITS, whole_number
from convserve_server.images import ImageDecoder

DEFAULT_TOP_K = 5
MAX_PARTS = 1024
"""Most parts one form may have: each costs a little bookkeeping before any size limit applies."""


@dataclass
class _Part:
    """One part of a form: its headers' useful values and its bytes."""

    name: str = ""
    filename: str | None = None
    content_type: str = ""
    data: bytearray = field(default_factory=bytearray)


class _FormReader:
    """The parts of a ``multipart/form-data`` body, through python-multipart's parser."""

    def __init__(self) -> None:
        self.parts: list[_Part] = []
        self._field = b""
        self._value = b""

    def read(self, body: bytes, boundary: bytes) -> list[_Part]:
        parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
        })
        try:
            parser.write(body)
            parser.finalize()
        except MultipartParseError as exc:
            raise InvalidInput(f"the multipart/form-data body is malformed: {exc}") from None
        return self.parts

    def _begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise InvalidInput(f"a form may have at most {MAX_PARTS} parts")
        self.parts.append(_Part())

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.parts[-1].data += data[start:end]

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name, value, part = self._field.lower(), self._value, self.parts[-1]
        self._field, self._value = b"", b""
        if name == b"content-disposition":
            _, options = parse_options_header(value)
            part.name = options.get(b"name", b"").decode("utf-8", "replace")
            filename = options.get(b"filename")
            part.filename = None if filename is None else filename.decode("utf-8", "replace")
        elif name == b"content-type":
            part.content_type = parse_options_header(value)[0].decode("latin-1")


def _top_k(call: Call, fields: dict[str, str], classes: int) -> int:
    text = fields.get("top_k", call.query.get("top_k"))
    if text is None:
        return min(DEFAULT_TOP_K, classes)
    top_k = whole_number(text)
    if top_k is None:
        raise InvalidInput(f"top_k must be a whole number of at most {MAX_COUNT_DIGITS} ASCII digits, got "
                           f"{quoted(text)}")
    return top_k


def _deadline(call: Call, fields: dict[str, str], received: float) -> float | None:
    """The deadline ``timeout`` (microseconds from ``received``, as Triton's infer parameter; a form field or in
    the query) sets; None without one or for 0."""
    text = fields.get("timeout", call.query.get("timeout"))
    if text is None:
        return None
    timeout = whole_number(text)
    if timeout is None:
        raise InvalidInput(f"timeout must be a whole number of microseconds, of at most {MAX_COUNT_DIGITS} ASCII "
                           f"digits, got {quoted(text)}")
    return None if timeout == 0 else received + timeout / 1e6


def images_of(call: Call) -> tuple[list[bytes], list[str | None], dict[str, str]]:
    """The request's encoded images, their file names (None where none was given) and its plain form fields."""
    kind, options = parse_options_header(call.headers.get("content-type", ""))
    if kind == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise InvalidInput("multipart/form-data without a boundary")
        parts = _FormReader().read(call.body, boundary)
        files = [part for part in parts if part.filename is not None or part.content_type.startswith("image/")]
        fields = {part.name: part.data.decode("utf-8", "replace") for part in parts if part not in files}
        if not files:
            raise InvalidInput("the form has no file: send images as files (curl -F image=@digit.png)")
        return [bytes(part.data) for part in files], [part.filename for part in files], fields
    if kind.startswith(b"image/") or kind == b"application/octet-stream":
        return [call.body], [None], {}
    raise HttpError(UNSUPPORTED_MEDIA, f"send images as multipart/form-data files (curl -F image=@digit.png) or "
                    f"one image as the body with an image/* content type, not {kind.decode('latin-1') or 'no type'}")


class ClassifyEndpoint:
    """Decodes, preprocesses and classifies image files through the model's batcher."""

    def __init__(self, core: InferenceCore, decoder: ImageDecoder) -> None:
        self.core = core
        self.decoder = decoder

    async def classify(self, call: Call) -> Reply:
        """Per image: the top label and score, the top k, and the file name; with the model that answered."""
        received = time.monotonic()
        name, version = call.params["name"], call.params.get("version", "")
        served = self.core.resolve(name, version)
        encoded, filenames, fields = await off_loop_if_large(len(call.body), images_of, call)
        top_k = _top_k(call, fields, served.model.num_classes)
        deadline = _deadline(call, fields, received)
        served, images = await self.decoder.preprocess_for_current(lambda: self.core.resolve(name, version), encoded,
                                                                   deadline)
        result = await self.core.classify(served, images, top_k, deadline)
        labels = served.model.card.labels
        answers: list[dict[str, Any]] = []
        for filename, indices, scores in zip(filenames, result.top_indices.tolist(), result.top_scores.tolist()):
            top = [{"label": labels[index], "score": score, "class_index": index} for index, score in zip(indices, scores)]
            answers.append({"filename": filename, "label": top[0]["label"], "score": top[0]["score"], "top_k": top})
        return json_reply({
            "model_name": served.name, "model_version": str(served.version),
            "execution_provider": served.model.provider, **verification_parameters(served.verification),
            "results": answers,
        })
