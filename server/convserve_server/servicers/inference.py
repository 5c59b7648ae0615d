"""The Open Inference Protocol (KServe v2) servicer, ``inference.GRPCInferenceService``."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version

import grpc.aio
import numpy as np

from convserve_client.protos import grpc_predict_v2_pb2 as pb
from convserve_client.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server.core import ServedVersion
from convserve_server.errors import InvalidInput, ModelNotFound
from convserve_server.servicers.status import ServicerBase, deadline_of, rpc
from convserve_server.servicers.tensors import checked_shape, fp32_from_bytes, fp32_from_values
from convserve_server.verification import Verification

SERVER_NAME = "convserve"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("convserve.v1.Classifier", "grpc.health.v1.Health", "grpc.reflection")
FP32 = "FP32"


def _server_version() -> str:
    try:
        return version("convserve")
    except PackageNotFoundError:
        return "0+unknown"


def _decode_input(request: pb.ModelInferRequest, served: ServedVersion) -> np.ndarray:
    card = served.model.card
    if len(request.inputs) != 1:
        raise InvalidInput(f"model {served.name} takes exactly one input {card.input_name!r}, got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != card.input_name:
        raise InvalidInput(f"unknown input {tensor.name!r}; model {served.name} takes {card.input_name!r}")
    if tensor.datatype != FP32:
        raise InvalidInput(f"input {tensor.name!r} must be FP32, got {tensor.datatype or 'no datatype'}")
    shape = checked_shape(tensor.shape, f"input {tensor.name!r}", rank=4)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs")
        if tensor.HasField("contents"):
            raise InvalidInput("an input cannot carry both contents and raw_input_contents")
        return fp32_from_bytes(request.raw_input_contents[0], shape, f"input {tensor.name!r}")
    return fp32_from_values(tensor.contents.fp32_contents, shape, f"input {tensor.name!r}")


def _check_requested_outputs(request: pb.ModelInferRequest, served: ServedVersion) -> None:
    for output in request.outputs:
        if output.name != served.model.card.output_name:
            raise ModelNotFound(f"unknown output {output.name!r}; model {served.name} has "
                                f"{served.model.card.output_name!r}")


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
    """Health, metadata and inference in the standard protocol."""

    @rpc("ServerLive")
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady")
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready)

    @rpc("ModelReady")
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        served = self.core.resolve(request.name, request.version)
        return pb.ModelReadyResponse(ready=served.ready and not self.core.draining)

    @rpc("ServerMetadata")
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=_server_version(), extensions=EXTENSIONS)

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
                **_verification_params(served.verification),
            },
        )

    @rpc("ModelInfer")
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        served = self.core.resolve(request.model_name, request.model_version)
        images = _decode_input(request, served)
        _check_requested_outputs(request, served)
        probabilities = await self.core.infer(served, images, deadline_of(context))
        response = pb.ModelInferResponse(model_name=served.name, model_version=str(served.version), id=request.id)
        tensor = response.outputs.add(
            name=served.model.card.output_name, datatype=FP32, shape=list(probabilities.shape)
        )
        if request.raw_input_contents:
            response.raw_output_contents.append(np.ascontiguousarray(probabilities, dtype="<f4").tobytes())
        else:
            tensor.contents.fp32_contents.extend(probabilities.ravel().tolist())
        return response
