"""What a served model takes, read from the server, and the requests the benchmark and the tests send it."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from convserve_protocol.protos import classifier_pb2 as cpb
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc

FP32 = "FP32"


class ModelUnavailable(Exception):
    """The server could not say what the model takes: it does not serve it, or it refused to pick one."""


@dataclass(frozen=True)
class ServedModel:
    """One model as the server describes it (Open Inference Protocol ``ModelMetadata``)."""

    name: str
    version: str
    input_name: str
    output_name: str
    image_shape: tuple[int, int, int]
    """(height, width, channels) of one preprocessed image."""
    classes: int


def read_served_model(address: str, model: str = "", timeout_s: float = 10) -> ServedModel:
    """Ask the server at ``address`` about ``model`` ("" for the one it serves unnamed calls with)."""
    with grpc.insecure_channel(address) as channel:
        try:
            metadata = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
                pb.ModelMetadataRequest(name=model), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise ModelUnavailable(f"{exc.code().name}: {exc.details()}") from None
    return served_model_from(metadata)


def served_model_from(metadata: pb.ModelMetadataResponse) -> ServedModel:
    """The model a ``ModelMetadata`` answer describes: one (N, H, W, C) input and one (N, classes) output."""
    if len(metadata.inputs) != 1 or len(metadata.outputs) != 1:
        raise ModelUnavailable(f"model {metadata.name} has {len(metadata.inputs)} inputs and {len(metadata.outputs)} "
                               "outputs; the benchmark loads models with one of each")
    tensor, output = metadata.inputs[0], metadata.outputs[0]
    if len(tensor.shape) != 4 or any(size <= 0 for size in tensor.shape[1:]) or len(output.shape) != 2:
        raise ModelUnavailable(f"model {metadata.name} takes {list(tensor.shape)} and returns {list(output.shape)}; "
                               "the benchmark loads (N, height, width, channels) images and (N, classes) answers")
    version = metadata.parameters["version"].string_param if "version" in metadata.parameters else ""
    height, width, channels = (int(size) for size in tensor.shape[1:])
    return ServedModel(name=metadata.name, version=version or (metadata.versions[-1] if metadata.versions else ""),
                       input_name=tensor.name, output_name=output.name, image_shape=(height, width, channels),
                       classes=int(output.shape[1]))


def infer_request(batch: np.ndarray, model_name: str, input_name: str) -> pb.ModelInferRequest:
    """An Open Inference Protocol ``ModelInfer`` request carrying ``batch`` as raw little-endian FP32."""
    request = pb.ModelInferRequest(model_name=model_name)
    request.inputs.add(name=input_name, datatype=FP32, shape=list(batch.shape))
    request.raw_input_contents.append(np.ascontiguousarray(batch, dtype="<f4").tobytes())
    return request


def classify_request(batch: np.ndarray, model_name: str, top_k: int = 1) -> cpb.ClassifyRequest:
    """A ``convserve.v1.Classifier/Classify`` request for ``batch``."""
    return cpb.ClassifyRequest(model_name=model_name, images=np.ascontiguousarray(batch, dtype="<f4").tobytes(),
                               shape=list(batch.shape), top_k=top_k)


def images_of(request: pb.ModelInferRequest) -> np.ndarray:
    """The FP32 images a raw ``ModelInfer`` request carries, shaped as it says (ValueError if they do not fit)."""
    if len(request.inputs) != 1 or len(request.raw_input_contents) != 1:
        raise ValueError("send one input, as raw_input_contents")
    return np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(list(request.inputs[0].shape))


def infer_response(request: pb.ModelInferRequest, version: str, output_name: str,
                   answer: np.ndarray) -> pb.ModelInferResponse:
    """The ``ModelInfer`` answer carrying ``answer`` as raw little-endian FP32."""
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
    response.outputs.add(name=output_name, datatype=FP32, shape=list(answer.shape))
    response.raw_output_contents.append(np.ascontiguousarray(answer, dtype="<f4").tobytes())
    return response
