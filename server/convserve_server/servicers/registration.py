"""Registering servicers so that a request that is not valid protobuf reaches them as :class:`MalformedRequest`.

With the generated ``add_*_to_server`` helpers, bytes that fail to parse end
the call as UNKNOWN inside grpcio, before any servicer code runs.  Here the
failure is handed to the servicer, whose error mapping answers INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message


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


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: Any) -> None:
    """Serve every method of ``service`` from the same-named method of ``servicer``.

    Methods are unary, or streaming both ways (the servicer's method then receives the request iterator).
    """
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        if method.client_streaming != method.server_streaming:
            raise ValueError(f"{method.full_name}: only unary and bidirectional streaming methods are served")
        make_handler = grpc.stream_stream_rpc_method_handler if method.client_streaming \
            else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make_handler(
            getattr(servicer, method.name),
            request_deserializer=tolerant_parser(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
