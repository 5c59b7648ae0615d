"""Admission of calls: what a call may hold while it waits for its request, and how many may be served at once.

gRPC's own ``maximum_concurrent_rpcs`` counts every call from its headers on: open health ``Watch`` streams and
calls that send headers and never a body fill it, and every real caller is then refused. Here instead:

- a call must deliver its request message within ``receive_timeout_s`` of its headers, or it ends with
  DEADLINE_EXCEEDED (a half-open call holds an HTTP/2 stream, not a slot);
- model calls (the inference and classifier services) are counted from the moment their request has arrived,
  and one over ``max_concurrent_rpcs`` is refused at once with RESOURCE_EXHAUSTED;
- health ``Watch`` streams are long-lived by design, so they are counted apart, in total and per peer host;
- so are inference streams (Triton's ``ModelStreamInfer``), from their headers on: a stream may stay open and idle
  between requests, as Triton's may, so it has no receive timeout. Its requests are bounded by the servicer.

Unary handlers are served as request-streaming ones so that the request is read by our code, under a timeout;
each wrapped handler is built once per method and reused.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import Counter
from typing import Any, Awaitable, Callable

import grpc
import grpc.aio

from convserve_server.memory import MemoryReleaser

WATCH_METHOD = "/grpc.health.v1.Health/Watch"
INFERENCE_STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
LARGE_MESSAGE_BYTES = 1 << 20
"""A request message this large has its memory released soon after (see :mod:`convserve_server.memory`)."""


class ConcurrencyLimit:
    """A count of calls in progress that refuses entry beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_progress = 0

    def try_enter(self) -> bool:
        """Take a slot if one is free."""
        if self.in_progress >= self.limit:
            return False
        self.in_progress += 1
        return True

    def leave(self) -> None:
        """Give a slot back."""
        self.in_progress -= 1


class PeerLimit:
    """Calls in progress, bounded in total and per peer host (the peer's address without its port)."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.total = total
        self.per_peer = per_peer
        self._by_peer: Counter[str] = Counter()
        self.in_progress = 0

    def try_enter(self, peer: str) -> bool:
        """Take a slot for ``peer`` if the total and its own share allow."""
        if self.in_progress >= self.total or self._by_peer[peer] >= self.per_peer:
            return False
        self._by_peer[peer] += 1
        self.in_progress += 1
        return True

    def leave(self, peer: str) -> None:
        """Give ``peer``'s slot back."""
        self.in_progress -= 1
        self._by_peer[peer] -= 1
        if not self._by_peer[peer]:
            del self._by_peer[peer]


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.1:5000`` → ``ipv4:10.0.0.1``; ``ipv6:[::1]:5000`` → ``ipv6:[::1]``."""
    host, separator, port = peer.rpartition(":")
    return host if separator and port.isdigit() else peer


async def receive_request(context: grpc.aio.ServicerContext, timeout_s: float) -> Any:
    """The call's one request message, or the call ends: DEADLINE_EXCEEDED if it is not whole in time."""
    try:
        async with asyncio.timeout(timeout_s):
            request = await context.read()
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"the request message did not arrive within {timeout_s:g} s of the call's headers")
        raise  # abort raises; this line only satisfies type checkers
    if request is grpc.aio.EOF:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without a request message")
    return request


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Serves unary calls under a receive timeout, counts model calls, health ``Watch`` and inference streams.

    ``counted_prefixes``: method paths (``/package.Service/``) whose calls take a slot of ``calls``.
    ``inference_streams`` bounds open ``ModelStreamInfer`` streams (unbounded if not given).
    """

    def __init__(self, counted_prefixes: tuple[str, ...], calls: ConcurrencyLimit, watches: PeerLimit,
                 receive_timeout_s: float, releaser: MemoryReleaser | None = None,
                 inference_streams: PeerLimit | None = None) -> None:
        self._counted_prefixes = counted_prefixes
        self._releaser = releaser
        self._calls = calls
        self._watches = watches
        self._inference_streams = inference_streams
        self._receive_timeout_s = receive_timeout_s
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = await continuation(handler_call_details)
            if handler is None:  # no such method: gRPC answers UNIMPLEMENTED; nothing to remember
                return handler
            handler = self._wrap(method, handler)
            self._handlers[method] = handler
        return handler

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_streaming:
            if method == INFERENCE_STREAM_METHOD and self._inference_streams is not None:
                return grpc.stream_stream_rpc_method_handler(
                    self._bounded_stream(handler.stream_stream, self._inference_streams, "ModelStreamInfer"),
                    request_deserializer=self._noting_large(handler.request_deserializer),
                    response_serializer=handler.response_serializer)
            return handler  # reflection: its messages are read by its own code as they come
        deserializer = self._noting_large(handler.request_deserializer)
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._watch(handler.unary_stream) if method == WATCH_METHOD else self._streaming(handler.unary_stream),
                request_deserializer=deserializer, response_serializer=handler.response_serializer)
        counted = method.startswith(self._counted_prefixes)
        return grpc.stream_unary_rpc_method_handler(
            self._counted(handler.unary_unary) if counted else self._timed(handler.unary_unary),
            request_deserializer=deserializer, response_serializer=handler.response_serializer)

    def _noting_large(self, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
        """The method's deserializer, which also has the memory of a large message released soon after.

        Open methods (health) take messages of up to --max-message-bytes from anyone, and an answered call
        leaves its buffers in the heap as much as a refused one.
        """
        releaser = self._releaser

        def deserialize(data: bytes) -> Any:
            if releaser is not None and len(data) >= LARGE_MESSAGE_BYTES:
                releaser.release_soon()
            return data if deserializer is None else deserializer(data)

        return deserialize

    def _timed(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def timed(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            return await behavior(await receive_request(context, self._receive_timeout_s), context)

        return timed

    def _counted(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        calls, releaser = self._calls, self._releaser

        async def counted(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                request = await receive_request(context, self._receive_timeout_s)
                if not calls.try_enter():
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"server busy: {calls.limit} calls in progress; retry later")
            except BaseException:
                if releaser is not None:
                    releaser.release_soon()
                raise
            try:
                return await behavior(request, context)
            except BaseException:
                # A refused request (bad input, overload) may have been large: give its memory back soon.
                if releaser is not None:
                    releaser.release_soon()
                raise
            finally:
                calls.leave()

        return counted

    def _streaming(self, behavior: Callable[..., Any]) -> Callable[..., Awaitable[None]]:
        async def streaming(requests: Any, context: grpc.aio.ServicerContext) -> None:
            await _write_all(behavior(await receive_request(context, self._receive_timeout_s), context), context)

        return streaming

    def _bounded_stream(self, behavior: Callable[..., Any], streams: PeerLimit,
                        name: str) -> Callable[..., Awaitable[None]]:
        async def bounded(requests: Any, context: grpc.aio.ServicerContext) -> None:
            await _run_within(streams, f"{name} streams", "retry later or send unary calls", context,
                              lambda: behavior(requests, context))

        return bounded

    def _watch(self, behavior: Callable[..., Any]) -> Callable[..., Awaitable[None]]:
        watches = self._watches

        async def watch(requests: Any, context: grpc.aio.ServicerContext) -> None:
            request = await receive_request(context, self._receive_timeout_s)
            await _run_within(watches, "health Watch streams", "poll Check instead", context,
                              lambda: behavior(request, context))

        return watch


async def _run_within(streams: PeerLimit, what: str, advice: str, context: grpc.aio.ServicerContext,
                      start: Callable[[], Any]) -> None:
    """Run a stream's behavior (``start()``) in a slot of ``streams`` for its peer; RESOURCE_EXHAUSTED if none."""
    peer = peer_host(context.peer())
    if not streams.try_enter(peer):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"too many {what} (at most {streams.total}, {streams.per_peer} per peer); {advice}")
    try:
        await _write_all(start(), context)
    finally:
        streams.leave(peer)


async def _write_all(result: Any, context: grpc.aio.ServicerContext) -> None:
    """Run a server-streaming behavior: an async generator's items are written; a coroutine writes its own."""
    if inspect.isasyncgen(result):
        async for response in result:
            await context.write(response)
    else:
        await result
