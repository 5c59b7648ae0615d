"""Admission of gRPC calls: what a call may hold while it waits for its request, and how many streams may be open.

gRPC's own ``maximum_concurrent_rpcs`` counts every call from its headers on: open health ``Watch`` streams and
calls that send headers and never a body fill it, and every real caller is then refused. Here instead:

- a call must deliver its request message within ``receive_timeout_s`` of its headers, or it ends with
  DEADLINE_EXCEEDED (a half-open call holds an HTTP/2 stream, not a slot, and not its partial message for
  longer than that);
- model calls are counted from the moment their request has arrived, by the one call wrapper every method
  passes through (:func:`convserve_server.servicers.status.answer`), in the core's
  :class:`~convserve_server.limits.ConcurrencyLimit`;
- health ``Watch`` streams are long-lived by design, so they are counted apart, in total and per peer host.
  One beyond the bounds ends UNIMPLEMENTED: gRPC's client-side health checking then takes the server as
  healthy without watching (gRFC A17), where any other refusal would mark a healthy replica unhealthy;
- so are inference streams (Triton's ``ModelStreamInfer``), from their headers on: a stream may stay open and idle
  between requests, as Triton's may, so it has no receive timeout. Its requests are bounded by the servicer.

These guards are built into each method's handler when the services are registered
(:mod:`convserve_server.servicers.registration`), not run as a server interceptor: grpc.aio pays for an
interceptor on every call, whatever it does.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc
import grpc.aio

from convserve_server.limits import ConcurrencyLimit, PeerLimit, peer_host
from convserve_server.memory import MemoryReleaser

__all__ = ["CallGuards", "ConcurrencyLimit", "PeerLimit", "peer_host", "receive_request"]

LARGE_MESSAGE_BYTES = 1 << 20
"""A request message this large has its memory released soon after (see :mod:`convserve_server.memory`)."""

Behavior = Callable[..., Any]


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


@dataclass(frozen=True)
class CallGuards:
    """The per-call guards of one server, applied to each method's behavior at registration."""

    receive_timeout_s: float
    watches: PeerLimit
    inference_streams: PeerLimit
    releaser: MemoryReleaser | None = None

    def noting_large(self, deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        """The method's deserializer, which also has the memory of a large message released soon after.

        Open methods (health) take messages of up to --max-message-bytes from anyone, and an answered call
        leaves its buffers in the heap as much as a refused one.
        """
        releaser = self.releaser
        if releaser is None:
            return deserializer

        def deserialize(data: bytes) -> Any:
            if len(data) >= LARGE_MESSAGE_BYTES:
                releaser.release_soon()
            return deserializer(data)

        return deserialize

    def unary(self, behavior: Behavior) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        """A unary behavior served request-streaming, so that its request is read under the receive timeout."""
        timeout_s = self.receive_timeout_s

        async def read_then_answer(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            return await behavior(await receive_request(context, timeout_s), context)

        return read_then_answer

    def watch(self, behavior: Behavior) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
        """Health's Watch: its request under the receive timeout, then a slot of ``watches`` for its peer."""
        timeout_s, watches = self.receive_timeout_s, self.watches

        async def watch(requests: Any, context: grpc.aio.ServicerContext) -> None:
            request = await receive_request(context, timeout_s)
            await _run_within(watches, "health Watch streams", "poll Check instead; until then gRPC clients "
                              "take this server as healthy", grpc.StatusCode.UNIMPLEMENTED, context,
                              lambda: behavior(request, context))

        return watch

    def inference_stream(self, behavior: Behavior) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
        """ModelStreamInfer: the stream runs in a slot of ``inference_streams`` for its peer."""
        streams = self.inference_streams

        async def bounded(requests: Any, context: grpc.aio.ServicerContext) -> None:
            await _run_within(streams, "ModelStreamInfer streams", "retry later or send unary calls",
                              grpc.StatusCode.RESOURCE_EXHAUSTED, context, lambda: behavior(requests, context))

        return bounded


async def _run_within(streams: PeerLimit, what: str, advice: str, refusal: grpc.StatusCode,
                      context: grpc.aio.ServicerContext, start: Callable[[], Any]) -> None:
    """Run a stream's behavior (``start()``) in a slot of ``streams`` for its peer; ``refusal`` if none."""
    peer = peer_host(context.peer())
    if not streams.try_enter(peer):
        await context.abort(refusal, f"too many {what} (at most {streams.total}, {streams.per_peer} per peer); "
                                     f"{advice}")
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
