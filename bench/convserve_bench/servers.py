"""The benchmark's two reference servers, each serving the Open Inference Protocol's ``ModelInfer``.

* ``noop``, the do-nothing server: the same grpc.aio stack and event loop as convserve, the
  same request decoding, no batcher and no model; it answers zeros of the right shape. What it
  costs is the cost of gRPC and Python themselves.
* ``naive``, a plain server as an experienced Python user would write one from gRPC's own
  examples: a synchronous ``grpc.server`` on a ``ThreadPoolExecutor(max_workers=10)`` whose
  handler decodes the request, calls ``session.run`` on an ONNX Runtime session with default
  options and replies. No batcher. A batching server slower than this at concurrency 1 has
  a batcher that costs latency.

Run as ``python -m convserve_bench.servers --host H --port P {noop,naive} ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path

import grpc
import grpc.aio
import numpy as np

from convserve_bench import rpc
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server import eventloop
from convserve_server.errors import StartupError

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
NAIVE_WORKER_THREADS = 10  # what gRPC's Python examples use


def loop_name(choice: str) -> str:
    """``uvloop`` or ``asyncio``: the loop ``choice`` gives on this machine (StartupError for a missing uvloop)."""
    return eventloop.loop_name(eventloop.loop_factory(choice))


class NoopInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Decodes every inference request and answers zeros, ``classes`` per image."""

    def __init__(self, classes: int, output_name: str) -> None:
        self._classes = classes
        self._output_name = output_name

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        images = rpc.images_of(request)
        answer = np.zeros((len(images), self._classes), dtype="<f4")
        return rpc.infer_response(request, request.model_version, self._output_name, answer)


class NaiveInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Runs the model in the handler: decode, ``session.run``, reply."""

    def __init__(self, model_path: Path) -> None:
        import onnxruntime as ort

        # Default options; only the CPU provider named, as onnxruntime-gpu requires a choice.
        self._session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        self._input_name = self._session.get_inputs()[0].name
        self._output_name = self._session.get_outputs()[0].name
        self._version = model_path.parent.name

    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        try:
            images = rpc.images_of(request)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        [answer] = self._session.run([self._output_name], {self._input_name: images})
        return rpc.infer_response(request, self._version, self._output_name, answer)


async def serve_noop(host: str, port: int, classes: int, output_name: str) -> None:
    """Serve the do-nothing server until killed."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(NoopInferenceServicer(classes, output_name), server)
    _listen(server, host, port)
    await server.start()
    await server.wait_for_termination()


def serve_naive(host: str, port: int, model_path: Path) -> None:
    """Serve the naive server until killed."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=NAIVE_WORKER_THREADS),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(NaiveInferenceServicer(model_path), server)
    _listen(server, host, port)
    server.start()
    server.wait_for_termination()


def _listen(server: grpc.Server | grpc.aio.Server, host: str, port: int) -> None:
    try:
        server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise SystemExit(f"cannot listen on {host}:{port}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    """The reference servers' command line."""
    parser = argparse.ArgumentParser(prog="python -m convserve_bench.servers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    kinds = parser.add_subparsers(dest="kind", required=True)
    noop = kinds.add_parser("noop", help="the do-nothing server")
    noop.add_argument("--classes", type=int, required=True, help="answers per image")
    noop.add_argument("--output-name", required=True, help="name of the answer's tensor")
    noop.add_argument("--event-loop", choices=eventloop.CHOICES, default="auto")
    naive = kinds.add_parser("naive", help="the naive server")
    naive.add_argument("--model-path", type=Path, required=True, help="the model.onnx to run")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run the reference server the arguments name, until killed."""
    args = build_parser().parse_args(argv)
    if args.kind == "naive":
        serve_naive(args.host, args.port, args.model_path)
        return
    try:
        factory = eventloop.loop_factory(args.event_loop)  # the loop convserve itself runs on
    except StartupError as exc:
        raise SystemExit(str(exc)) from None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve_noop(args.host, args.port, args.classes, args.output_name))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
