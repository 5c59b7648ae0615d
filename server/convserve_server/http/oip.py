"""The Open Inference Protocol's REST endpoints and Triton's HTTP extensions (classification, model
configuration, statistics, model repository), over the same core calls as the gRPC servicer."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_server.core import InferenceCore, ServedVersion
from convserve_server.errors import InvalidInput
from convserve_server.http import tensors
from convserve_server.http.errors import UNAVAILABLE
from convserve_server.http.messages import Call, Reply, json_reply, off_loop_if_large
from convserve_server.triton import (
    FP32, PLATFORM, SERVER_NAME, check_repository_request, index_entry, model_config, model_statistics,
    server_version,
)
from convserve_server.verification import Verification

EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "statistics", "model_repository",
              "classify")
"""Triton's names for the extensions served over HTTP, and ``classify`` (images in, labels out)."""


def verification_parameters(verification: Verification) -> dict[str, Any]:
    """``verified``, and where golden vectors were run, the provider, worst difference and tolerance."""
    parameters: dict[str, Any] = {"verified": verification.verified}
    if verification.measured:
        parameters["verification_provider"] = verification.provider
        parameters["verification_worst_difference"] = float(verification.worst_difference or 0.0)
        parameters["verification_tolerance"] = float(verification.tolerance or 0.0)
    return parameters


def _proto_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP endpoints write it: proto field names, every scalar field (defaults
    too), 64-bit integers as JSON numbers (protobuf's own JSON writes them as strings, which perf_analyzer's
    HTTP client does not read), enums by name."""
    return {field.name: _field_json(field, getattr(message, field.name))
            for field in message.DESCRIPTOR.fields
            if not (field.message_type is not None and not _is_repeated(field) and not message.HasField(field.name))}


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _field_json(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {key: _value_json(value_field, item) for key, item in value.items()}
    if _is_repeated(field):
        return [_value_json(field, item) for item in value]
    return _value_json(field, value)


def _value_json(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        return _proto_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    return value


def _optional_object(body: bytes, what: str) -> dict[str, Any]:
    """The body's JSON object, or {} for an empty body."""
    if not body.strip():
        return {}
    value = tensors.parse_json(body, what)
    if not isinstance(value, dict) or not isinstance(value.get("parameters") or {}, dict):
        raise InvalidInput(f"{what} must be a JSON object, its parameters an object")
    return value


def _parse_infer(call: Call, served: ServedVersion,
                 received: float) -> tuple[np.ndarray, tensors.OutputForm, Any, float | None]:
    """The request's input batch, how it wants its output, its id and its deadline.  The parsed JSON is dropped
    on return: its numbers take 32 bytes each, and only the float32 array waits for the batcher."""
    header, binary = tensors.split_body(call.body, call.headers.get(tensors.HEADER_LENGTH))
    request = tensors.request_object(header)
    return (tensors.decode_input(request, binary, served), tensors.output_form(request, served), request.get("id"),
            tensors.deadline_of(request, received))


class OipEndpoints:
    """Each method answers one endpoint; path parameters are ``name`` and ``version``."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def server_live(self, call: Call) -> Reply:
        """Live from the moment the server listens until it stops."""
        return json_reply({"live": True})

    async def server_ready(self, call: Call) -> Reply:
        """Ready (200) once every model is warm and until shutdown begins; else 503, which fails a probe."""
        ready = self.core.ready
        return json_reply({"ready": ready}, *(() if ready else (UNAVAILABLE,)))

    async def server_metadata(self, call: Call) -> Reply:
        """Name, version and extensions."""
        return json_reply({"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)})

    async def model_ready(self, call: Call) -> Reply:
        """200 if the version takes requests, 503 if it does not (yet, or any more); unknown: 404."""
        served = self.core.resolve(call.params["name"], call.params.get("version", ""))
        ready = self.core.version_ready(served)
        return json_reply({"name": served.name, "ready": ready}, *(() if ready else (UNAVAILABLE,)))

    async def model_metadata(self, call: Call) -> Reply:
        """The model's tensors, versions and convserve's parameters (provider, labels, preprocessing, verified)."""
        served = self.core.resolve(call.params["name"], call.params.get("version", ""))
        card = served.model.card
        height, width, channels = served.model.input_shape
        return json_reply({
            "name": served.name,
            "versions": [str(version) for version in self.core.versions(served.name)],
            "platform": PLATFORM,
            "inputs": [{"name": card.input_name, "datatype": FP32, "shape": [-1, height, width, channels]}],
            "outputs": [{"name": card.output_name, "datatype": FP32, "shape": [-1, served.model.num_classes]}],
            "parameters": {
                "execution_provider": served.model.provider,
                "version": str(served.version),
                "labels": json.dumps(list(card.labels)),
                "preprocessing": card.preprocessing.to_json(),
                "max_batch_size": self.core.max_batch_size,
                "default": served.name == self.core.default_model,
                **verification_parameters(served.verification),
            },
        })

    async def infer(self, call: Call) -> Reply:
        """Inference through the model's batcher, which HTTP and gRPC requests share."""
        received = time.monotonic()
        served = self.core.resolve(call.params["name"], call.params.get("version", ""))
        images, form, request_id, deadline = await off_loop_if_large(len(call.body), _parse_infer, call, served,
                                                                     received)
        probabilities = await self.core.infer(served, images, deadline)
        body, headers = tensors.encode_response(served, request_id, probabilities, form)
        return Reply(body, headers=headers)

    async def model_config(self, call: Call) -> Reply:
        """Triton's model configuration, as Triton's HTTP endpoint gives it (the object itself)."""
        setup = self.core.configuration(call.params["name"], call.params.get("version", ""))
        return json_reply(_proto_json(model_config(setup)))

    async def model_statistics(self, call: Call) -> Reply:
        """Triton's statistics of every model, of one, or of one version."""
        served: list[ServedVersion] = self.core.loaded(call.params.get("name", ""), call.params.get("version", ""))
        response = pb.ModelStatisticsResponse(model_stats=[model_statistics(version) for version in served])
        return json_reply(_proto_json(response))

    async def repository_index(self, call: Call) -> Reply:
        """Triton's repository index: a JSON array of models with their state (``{"ready": true}``: ready only)."""
        only_ready = _optional_object(call.body, "the repository index request").get("ready") is True
        entries = [entry for entry in (await self.core.repository_index()) if entry.ready or not only_ready]
        return json_reply([_proto_json(index_entry(entry)) for entry in entries])

    async def repository_load(self, call: Call) -> Reply:
        """Serve a model of the repository, or pick up its new versions."""
        request = _optional_object(call.body, "the load request")
        check_repository_request("", request.get("parameters"))
        await self.core.load_model(call.params["name"])
        return json_reply({})

    async def repository_unload(self, call: Call) -> Reply:
        """Stop serving a model (tritonclient's unload_dependents is accepted: convserve models have none)."""
        request = _optional_object(call.body, "the unload request")
        check_repository_request("", request.get("parameters"), accepted=frozenset({"unload_dependents"}))
        await self.core.unload_model(call.params["name"])
        return json_reply({})

