"""Optional bearer-token authentication; health and reflection stay open."""

from __future__ import annotations

import hmac
from typing import Any, Awaitable, Callable

import grpc
import grpc.aio

_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


async def _deny(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization' metadata")


_DENY_HANDLER = grpc.unary_unary_rpc_method_handler(_deny)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with ``authorization: Bearer <token>`` metadata.

    The scheme name is case-insensitive (RFC 7235: ``bearer``, ``BEARER``); the token is compared exactly,
    in constant time.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = token.encode()

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
        return _DENY_HANDLER

    def _is_expected(self, value: str | bytes) -> bool:
        given = value.encode() if isinstance(value, str) else value
        scheme, _, token = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(b" "), self._expected)
