"""The do-nothing ceiling: an Open Inference Protocol server that decodes each request and returns a fixed answer.

Same gRPC stack, same protocol, same request decoding and the same choice of
event loop as convserve, but no batcher and no model: what is left is the cost
of gRPC and Python themselves.
"""

from __future__ import annotations

import argparse

import grpc.aio
import numpy as np

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server import eventloop

NUM_CLASSES = 10


class NoopInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Answers every inference with zeros of the right shape."""

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        tensor = request.inputs[0]
        images = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(list(tensor.shape))
        answer = np.zeros((len(images), NUM_CLASSES), dtype="<f4")
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name="probabilities", datatype="FP32", shape=list(answer.shape))
        response.raw_output_contents.append(answer.tobytes())
        return response


async def run(host: str, port: int) -> None:
    """Serve until killed."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(NoopInferenceServicer(), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--event-loop", choices=eventloop.CHOICES, default="auto")
    args = parser.parse_args()
    eventloop.run(lambda: run(args.host, args.port), eventloop.loop_factory(args.event_loop))
