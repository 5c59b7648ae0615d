"""The Open Inference Protocol (KServe v2) servicer, ``inference.GRPCInferenceService``, with Triton's
streaming inference and its classification, model configuration, statistics and model repository extensions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc.aio
import numpy as np

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server.core import ServedVersion
from convserve_server.errors import InvalidInput, ModelNotFound, quoted
from convserve_server.servicers.registration import MalformedRequest
from convserve_server.servicers.status import Failure, ServicerBase, answer, deadline_of, rpc
from convserve_server.servicers.streaming import answer_each
from convserve_server.servicers.tensors import checked_shape, fp32_from_bytes, fp32_from_values
from convserve_server.triton import (
    BYTES, FP32, PLATFORM, SERVER_NAME, bytes_tensor, check_repository_request, classifications,
    index_entry, model_config, model_statistics, server_version,
)
from convserve_server.verification import Verification

EXTENSIONS = ("convserve.v1.Classifier", "grpc.health.v1.Health", "grpc.reflection",
              "classification", "model_configuration", "statistics", "model_repository")
CLASSIFICATION = "classification"
MAX_ID_BYTES = 1024
"""Longest request ``id`` (UTF-8 bytes), which the answer echoes: answers stay about as large as the model's output."""


def _decode_input(request: pb.ModelInferRequest, served: ServedVersion) -> np.ndarray:
    card = served.model.card
    if len(request.inputs) != 1:
        raise InvalidInput(f"model {served.name} takes exactly one input {quoted(card.input_name)}, got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != card.input_name:
        raise InvalidInput(f"unknown input {quoted(tensor.name)}; model {served.name} takes {quoted(card.input_name)}")
    if tensor.datatype != FP32:
        raise InvalidInput(f"input {quoted(tensor.name)} must be FP32, got {tensor.datatype or 'no datatype'}")
    what = f"input {quoted(tensor.name)}"
    shape = checked_shape(tensor.shape, what, rank=4)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs")
        if tensor.HasField("contents"):
            raise InvalidInput("an input cannot carry both contents and raw_input_contents")
        return fp32_from_bytes(request.raw_input_contents[0], shape, what)
    return fp32_from_values(tensor.contents.fp32_contents, shape, what)


def _check_id(request_id: str) -> None:
    if len(request_id) > MAX_ID_BYTES // 4 and len(request_id.encode()) > MAX_ID_BYTES:
        raise InvalidInput(f"the request id is {len(request_id.encode())} bytes long; at most {MAX_ID_BYTES} "
                           "(it is echoed in the answer)")


def _echoed(text: str) -> str:
    """A caller's string echoed in a failed stream request's answer: as sent, or "" if longer than an id may be."""
    return text if len(text) <= MAX_ID_BYTES // 4 or len(text.encode()) <= MAX_ID_BYTES else ""


def _requested_classes(request: pb.ModelInferRequest, served: ServedVersion) -> int:
    """Check the requested outputs; how many top classes Triton's classification parameter asks for (0: the
    output as a tensor). A count above the model's classes gives them all, highest first."""
    classes = 0
    for output in request.outputs:
        if output.name != served.model.card.output_name:
            raise ModelNotFound(f"unknown output {quoted(output.name)}; model {served.name} has "
                                f"{quoted(served.model.card.output_name)}")
        if CLASSIFICATION in output.parameters:
            parameter = output.parameters[CLASSIFICATION]
            kind = parameter.WhichOneof("parameter_choice")
            if kind not in ("int64_param", "uint64_param"):
                raise InvalidInput(f"output {quoted(output.name)}: the classification parameter must be an integer "
                                   f"count, got {kind or 'no value'}")
            count = getattr(parameter, kind)
            if count < 1:
                raise InvalidInput(f"output {quoted(output.name)}: the classification count must be at least 1, "
                                   f"got {count}")
            classes = min(count, served.model.num_classes)
    return classes


def _add_probabilities(response: pb.ModelInferResponse, served: ServedVersion, probabilities: np.ndarray,
                       raw: bool) -> None:
    """The model's output as an FP32 tensor: raw bytes if ``raw``, else typed values."""
    tensor = response.outputs.add(name=served.model.card.output_name, datatype=FP32, shape=list(probabilities.shape))
    if raw:
        response.raw_output_contents.append(np.ascontiguousarray(probabilities, dtype="<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(probabilities.ravel().tolist())


def _add_classifications(response: pb.ModelInferResponse, served: ServedVersion, classes: list[bytes],
                         count: int, raw: bool) -> None:
    """The top ``count`` classes of each image as a BYTES tensor [N, count]: raw if ``raw``, else typed."""
    tensor = response.outputs.add(name=served.model.card.output_name, datatype=BYTES,
                                  shape=[len(classes) // count, count])
    if raw:
        response.raw_output_contents.append(bytes_tensor(classes))
    else:
        tensor.contents.bytes_contents.extend(classes)


def _param(value: str | int | bool | float) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=value)


def _verification_params(verification: Verification) -> dict[str, pb.InferParameter]:
    """``verified``, and where golden vectors were run, the provider, worst difference and tolerance."""
    params = {"verified": _param(verification.verified)}
    if verification.measured:
        params["verification_provider"] = _param(verification.provider)
        params["verification_worst_difference"] = _param(float(verification.worst_difference or 0.0))
        params["verification_tolerance"] = _param(float(verification.tolerance or 0.0))
    return params


class InferenceServicer(ServicerBase, pb_grpc.GRPCInferenceServiceServicer):
    """Health, metadata and inference in the standard protocol, and Triton's configuration, statistics and
    model repository extensions."""

    @rpc("ServerLive")
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady")
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready)

    @rpc("ModelReady")
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        # As Triton (InferenceServer::ModelIsReady): an unknown or unloaded model is not an error, only not ready.
        try:
            served = self.core.resolve(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.core.version_ready(served))

    @rpc("ServerMetadata")
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

    @rpc("ModelMetadata")
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        served = self.core.resolve(request.name, request.version)
        card = served.model.card
        height, width, channels = served.model.input_shape
        return pb.ModelMetadataResponse(
            name=served.name,
            versions=[str(v) for v in self.core.versions(served.name)],
            platform=PLATFORM,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(
                name=card.input_name, datatype=FP32, shape=[-1, height, width, channels])],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(
                name=card.output_name, datatype=FP32, shape=[-1, served.model.num_classes])],
            parameters={
                "execution_provider": _param(served.model.provider),
                "version": _param(str(served.version)),
                "labels": _param(json.dumps(list(card.labels))),
                "preprocessing": _param(card.preprocessing.to_json()),
                "max_batch_size": _param(self.core.max_batch_size),
                "default": _param(served.name == self.core.default_model),
                **_verification_params(served.verification),
            },
        )

    @rpc("ModelInfer")
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self._infer(request, context)

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest | MalformedRequest],
                               context: grpc.aio.ServicerContext) -> None:
        """Triton's streaming inference: each request is answered on the stream once computed (match them by id);
        a failed one gets ``error_message``, prefixed with its status code name, and the stream goes on."""

        async def stream_answer(request: pb.ModelInferRequest | MalformedRequest) -> pb.ModelStreamInferResponse:
            result = await answer(self, "ModelStreamInfer", InferenceServicer._infer, request, context)
            if not isinstance(result, Failure):
                return pb.ModelStreamInferResponse(infer_response=result)
            identity = pb.ModelInferResponse()
            if isinstance(request, pb.ModelInferRequest):
                identity = pb.ModelInferResponse(id=_echoed(request.id), model_name=_echoed(request.model_name),
                                                 model_version=_echoed(request.model_version))
            return pb.ModelStreamInferResponse(error_message=f"{result.code.name}: {result.message}",
                                               infer_response=identity)

        await answer_each(requests, context, stream_answer)

    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        """One inference request's response (a domain error if it cannot be answered)."""
        _check_id(request.id)
        served = self.core.resolve(request.model_name, request.model_version)
        images = _decode_input(request, served)
        top_classes = _requested_classes(request, served)
        probabilities = await self.core.infer(served, images, deadline_of(context))
        response = pb.ModelInferResponse(model_name=served.name, model_version=str(served.version), id=request.id)
        raw = bool(request.raw_input_contents)  # answered in the form the input came in
        if top_classes:
            _add_classifications(response, served, classifications(probabilities, top_classes,
                                                                   served.model.card.labels), top_classes, raw)
        else:
            _add_probabilities(response, served, probabilities, raw)
        return response

    @rpc("ModelConfig")
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=model_config(self.core.configuration(request.name, request.version)))

    @rpc("ModelStatistics")
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.version and not request.name:
            raise InvalidInput("a version needs a model name")
        served = self.core.loaded(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(version) for version in served])

    @rpc("RepositoryIndex")
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        check_repository_request(request.repository_name)
        entries = [entry for entry in (await self.core.repository_index()) if entry.ready or not request.ready]
        return pb.RepositoryIndexResponse(models=[index_entry(entry) for entry in entries])

    @rpc("RepositoryModelLoad")
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        check_repository_request(request.repository_name, request.parameters)
        await self.core.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc("RepositoryModelUnload")
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        # tritonclient always sends unload_dependents; convserve models have no dependents (no ensembles).
        check_repository_request(request.repository_name, request.parameters,
                                 accepted=frozenset({"unload_dependents"}))
        await self.core.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()
