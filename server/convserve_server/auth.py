"""Optional bearer-token authentication; health and reflection stay open."""

from __future__ import annotations

import hmac
from typing import Any, Awaitable, Callable

import grpc
import grpc.aio

from convserve_server.memory import MemoryReleaser

_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with ``authorization: Bearer <token>`` metadata.

    The scheme name is case-insensitive (RFC 7235: ``bearer``, ``BEARER``); the token is compared exactly,
    in constant time.
    """

    def __init__(self, token: str, releaser: MemoryReleaser | None = None) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = token.encode()
        self._releaser = releaser
        # Request-streaming, and never reading: the call ends at its headers, so gRPC does not receive, buffer
        # and parse a message of up to --max-message-bytes from a caller it then refuses.
        self._deny_handler = grpc.stream_unary_rpc_method_handler(self._deny)

    async def _deny(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        if self._releaser is not None:
            self._releaser.release_soon()  # what gRPC received before the refusal is freed; give it back
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization' metadata")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(_OPEN_PREFIXES):
            return await continuation(handler_call_details)
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization" and self._is_expected(value):
                return await continuation(handler_call_details)
        return self._deny_handler

    def _is_expected(self, value: str | bytes) -> bool:
        given = value.encode() if isinstance(value, str) else value
        scheme, _, token = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(b" "), self._expected)
