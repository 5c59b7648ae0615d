"""Registering servicers with their per-call guards (:mod:`convserve_server.admission`), and so that a request
that is not valid protobuf reaches them as :class:`MalformedRequest`.

With the generated ``add_*_to_server`` helpers, bytes that fail to parse end
the call as UNKNOWN inside grpcio, before any servicer code runs.  Here the
failure is handed to the servicer, whose error mapping answers INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import grpc
import grpc.aio
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2

from convserve_server.admission import CallGuards

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass(frozen=True)
class MalformedRequest:
    """Request bytes that do not parse as the method's message type."""

    message_type: str
    error: str


def tolerant_parser(message_class: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    """``message_class.FromString`` that returns :class:`MalformedRequest` instead of raising."""

    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return MalformedRequest(message_class.DESCRIPTOR.full_name, str(exc))

    return parse


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: Any, guards: CallGuards) -> None:
    """Serve every method of ``service`` from the same-named method of ``servicer``, under ``guards``.

    Methods are unary (read under the receive timeout), or streaming both ways (the servicer's method then
    receives the request iterator; ModelStreamInfer runs in a slot of the inference streams).
    """
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        if method.client_streaming != method.server_streaming:
            raise ValueError(f"{method.full_name}: only unary and bidirectional streaming methods are served")
        behavior = getattr(servicer, method.name)
        serializer = response_class.SerializeToString
        if method.client_streaming:  # answers are serialized in the guards, which count their bytes
            behavior = guards.inference_stream(behavior, serializer)
            make_handler = grpc.stream_stream_rpc_method_handler
        else:
            behavior = guards.unary(behavior, serializer)
            make_handler = grpc.stream_unary_rpc_method_handler
        handlers[method.name] = make_handler(
            behavior,
            request_deserializer=guards.noting_large(tolerant_parser(request_class)),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def add_health_service(server: grpc.aio.Server, servicer: health.aio.HealthServicer, guards: CallGuards) -> None:
    """Serve gRPC's standard health service from ``servicer``: Check under the receive timeout, Watch also
    bounded per peer and in all."""
    parse = guards.noting_large(health_pb2.HealthCheckRequest.FromString)
    serialize = health_pb2.HealthCheckResponse.SerializeToString
    handlers = {
        "Check": grpc.stream_unary_rpc_method_handler(guards.unary(servicer.Check, serialize),
                                                      request_deserializer=parse),
        "Watch": grpc.stream_stream_rpc_method_handler(guards.watch(servicer.Watch), request_deserializer=parse,
                                                       response_serializer=serialize),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(HEALTH_SERVICE, handlers),))
