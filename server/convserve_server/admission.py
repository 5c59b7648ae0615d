"""Admission of gRPC calls: what a call may hold while it waits for its request, and how many streams may be open.

gRPC's own ``maximum_concurrent_rpcs`` counts every call from its headers on: open health ``Watch`` streams and
calls that send headers and never a body fill it, and every real caller is then refused. Here instead:

- a call must deliver its request message within ``receive_timeout_s`` of its headers, or it ends with
  DEADLINE_EXCEEDED (a half-open call holds an HTTP/2 stream, not a slot, and not its partial message for
  longer than that);
- model calls are counted from the moment their request has arrived (a unary one until gRPC has sent its
  answer), by the one call wrapper every method passes through
  (:func:`convserve_server.servicers.status.answer`), in the core's
  :class:`~convserve_server.limits.ConcurrencyLimit`;
- health ``Watch`` streams are long-lived by design, so they are counted apart, in total and per peer host.
  One beyond the bounds ends UNIMPLEMENTED: gRPC's client-side health checking then takes the server as
  healthy without watching (gRFC A17), where any other refusal would mark a healthy replica unhealthy;
- so are inference streams (Triton's ``ModelStreamInfer``), from their headers on: a stream may stay open and idle
  between requests, as Triton's may, so it has no receive timeout, but one that sends no request message for
  ``stream_idle_timeout_s`` is ended (:class:`StreamDeadlines`; a message it left half-sent is held by gRPC
  until then), and so is one whose answer has waited ``write_timeout_s`` to be written. Its requests are
  bounded by the servicer;
- answers handed to gRPC and not yet delivered (a caller that does not read them) are counted per connection
  (:class:`UnsentAnswers`); past a bound, or once they have made no progress for a while, new calls on that
  connection are refused at once.

These guards are built into each method's handler when the services are registered
(:mod:`convserve_server.servicers.registration`), not run as a server interceptor: grpc.aio pays for an
interceptor on every call, whatever it does.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc
import grpc.aio

from convserve_server.limits import ConcurrencyLimit, PeerLimit, peer_host
from convserve_server.memory import MemoryReleaser

__all__ = ["CallGuards", "ConcurrencyLimit", "PeerLimit", "StreamDeadlines", "UnsentAnswers", "peer_host",
           "receive_request"]

LARGE_MESSAGE_BYTES = 1 << 20
"""A request message this large has its memory released soon after (see :mod:`convserve_server.memory`)."""

COUNTED_ANSWER_BYTES = 16 * 1024
"""Answers this large or larger are counted in :class:`UnsentAnswers` until delivered. Smaller ones are not
(they cost no look-up): a connection holds at most --max-concurrent-streams unary ones (256 × 16 KiB = 4 MiB)."""

DEFAULT_MAX_UNSENT_BYTES = 64 * 1024 * 1024
DEFAULT_WRITE_TIMEOUT_S = 30.0

log = logging.getLogger(__name__)

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


class UnsentAnswers:
    """Bytes of answers handed to gRPC and not yet delivered, per connection, and when each connection's
    answers last made progress.

    gRPC's peer string (``ipv4:10.0.0.1:5000``) names one TCP connection. gRPC finishes a call (and runs its
    done callbacks) only once its answer and status are written, which a caller that advertises no receive
    window, or does not read its socket, never lets happen: the answer stays in gRPC's buffers, and grpc.aio
    offers no way to end a call whose handler has returned. So the connection is refused new calls instead,
    once it holds more than ``limit_bytes`` or its answers have made no progress for ``write_timeout_s``.
    """

    def __init__(self, limit_bytes: int = DEFAULT_MAX_UNSENT_BYTES,
                 write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S) -> None:
        self.limit_bytes = limit_bytes
        self.write_timeout_s = write_timeout_s
        self._bytes: dict[str, int] = {}
        self._progress: dict[str, float] = {}  # when an answer of the connection was last delivered, or first held

    @property
    def holding(self) -> bool:
        """Whether any connection holds a counted answer (if not, no call needs its peer looked up)."""
        return bool(self._bytes)

    def held(self, peer: str) -> int:
        """Bytes of answers held for ``peer``'s connection."""
        return self._bytes.get(peer, 0)

    def refusal(self, peer: str) -> str | None:
        """Why a new call on ``peer``'s connection is refused, or None if it is not."""
        held = self._bytes.get(peer)
        if held is None:
            return None
        if held > self.limit_bytes:
            return (f"{held} bytes of answers on this connection are not yet read (at most {self.limit_bytes}); "
                    "read them, or retry later")
        stalled_s = time.monotonic() - self._progress[peer]
        if stalled_s > self.write_timeout_s:
            return (f"answers on this connection have not been read for {stalled_s:.0f} s (at most "
                    f"{self.write_timeout_s:g} s); read them, or retry later")
        return None

    def hold(self, peer: str, size: int) -> None:
        """An answer of ``size`` bytes was handed to gRPC for ``peer``'s connection."""
        held = self._bytes.get(peer)
        if held is None:
            self._bytes[peer] = size
            self._progress[peer] = time.monotonic()
        else:
            self._bytes[peer] = held + size

    def delivered(self, peer: str, size: int) -> None:
        """gRPC has finished the call of an answer of ``size`` bytes: written, or its connection gone."""
        held = self._bytes[peer] - size
        if held:
            self._bytes[peer] = held
            self._progress[peer] = time.monotonic()
        else:
            del self._bytes[peer], self._progress[peer]


class _StreamRefused(Exception):
    """A stream's connection holds too many unread answers: the stream is ended (RESOURCE_EXHAUSTED)."""


class _StreamClock:
    """A stream's request iterator that notes when its last request arrived, and since when an answer of the
    stream has waited to be written; it ends the stream at a request that arrives while its connection is
    refused new calls (see :class:`UnsentAnswers`)."""

    def __init__(self, requests: AsyncIterator[Any], unsent: UnsentAnswers, peer: str) -> None:
        self._requests = requests
        self._unsent = unsent
        self._peer = peer
        self.last_message = time.monotonic()
        self.writing_since: float | None = None
        self.ending: str | None = None  # why the sweep is ending the stream

    def __aiter__(self) -> _StreamClock:
        return self

    async def __anext__(self) -> Any:
        request = await self._requests.__anext__()
        self.last_message = time.monotonic()
        if self._unsent.holding:
            refusal = self._unsent.refusal(self._peer)
            if refusal is not None:
                raise _StreamRefused(refusal)
        return request


class _CountedWriter:
    """A stream's context whose ``write`` serializes each answer here, counts one of 16 KiB or more for the
    connection in :class:`UnsentAnswers` until gRPC has written it, and notes since when it waits."""

    def __init__(self, context: grpc.aio.ServicerContext, serializer: Callable[[Any], bytes],
                 unsent: UnsentAnswers, peer: str, clock: _StreamClock) -> None:
        self._context = context
        self._serializer = serializer
        self._unsent = unsent
        self._peer = peer
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        """Write one answer (a message of the method's response type)."""
        answer = self._serializer(message)
        size = len(answer)
        counted = size >= COUNTED_ANSWER_BYTES
        if counted:
            self._unsent.hold(self._peer, size)
        self._clock.writing_since = time.monotonic()
        try:
            await self._context.write(answer)
        except BaseException:
            if counted:  # gRPC holds the answer until the call is finished
                unsent, peer = self._unsent, self._peer
                self._context.add_done_callback(lambda _context: unsent.delivered(peer, size))
            raise  # writing_since stays set: an answer is still being written
        self._clock.writing_since = None
        if counted:
            self._unsent.delivered(self._peer, size)


class StreamDeadlines:
    """Ends streams that have sent no request message for ``idle_timeout_s`` (0: never), or whose answer has
    waited ``write_timeout_s`` to be written (their caller does not read).

    From Python a stream that idles between requests, as Triton's may, cannot be told from one that has sent
    part of a message and stalled, which gRPC buffers (up to --max-message-bytes) for as long as the stream
    is open. One sweep per server, a quarter of the shorter timeout and at most a second apart while streams
    are open, cancels the handlers of streams past a deadline; no timer per stream or per request.
    """

    def __init__(self, idle_timeout_s: float, write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.write_timeout_s = write_timeout_s
        self._open: dict[asyncio.Task[Any], _StreamClock] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def watch(self, clock: _StreamClock) -> _StreamClock:
        """Watch the current task's stream, whose requests come through ``clock``, until :meth:`forget`."""
        task = asyncio.current_task()
        assert task is not None, "a stream is handled in a task"
        self._open[task] = clock
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return clock

    def forget(self) -> None:
        """The current task's stream has ended; the sweep stops with the last one."""
        self._open.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
        if not self._open and self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _sweep(self) -> None:
        shortest_s = min(self.idle_timeout_s or self.write_timeout_s, self.write_timeout_s)
        while True:
            await asyncio.sleep(min(shortest_s / 4, 1.0))
            now = time.monotonic()
            for task, clock in list(self._open.items()):
                if clock.ending is None:
                    clock.ending = self._reason_to_end(clock, now)
                    if clock.ending is not None:
                        task.cancel()

    def _reason_to_end(self, clock: _StreamClock, now: float) -> str | None:
        if clock.writing_since is not None and now - clock.writing_since > self.write_timeout_s:
            return f"an answer on this stream was not read for {self.write_timeout_s:g} s (the server's write timeout)"
        if self.idle_timeout_s and now - clock.last_message > self.idle_timeout_s:
            return (f"no request message on this stream for {self.idle_timeout_s:g} s (the server's stream idle "
                    "timeout); open a new stream to send more")
        return None


@dataclass(frozen=True)
class CallGuards:
    """The per-call guards of one server, applied to each method's behavior at registration."""

    receive_timeout_s: float
    watches: PeerLimit
    inference_streams: PeerLimit
    releaser: MemoryReleaser | None = None
    unsent: UnsentAnswers = field(default_factory=UnsentAnswers)
    stream_deadlines: StreamDeadlines = field(default_factory=lambda: StreamDeadlines(0))

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

    def unary(self, behavior: Behavior,
              serializer: Callable[[Any], bytes]) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[bytes]]:
        """A unary behavior served request-streaming, so that its request is read under the receive timeout;
        its answer serialized here (register it with no response serializer), so that its size is known.

        A call on a connection that holds too many unread answers is refused at once (RESOURCE_EXHAUSTED), and
        a large answer is counted for its connection until gRPC has finished the call.
        """
        timeout_s, unsent = self.receive_timeout_s, self.unsent

        async def read_then_answer(requests: Any, context: grpc.aio.ServicerContext) -> bytes:
            if unsent.holding:
                refusal = unsent.refusal(context.peer())
                if refusal is not None:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            answer = serializer(await behavior(await receive_request(context, timeout_s), context))
            if len(answer) >= COUNTED_ANSWER_BYTES:
                _count_until_finished(unsent, context, len(answer))
            return answer

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

    def inference_stream(self, behavior: Behavior, serializer: Callable[[Any], bytes],
                         ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
        """ModelStreamInfer: the stream runs in a slot of ``inference_streams`` for its peer, its answers are
        serialized here (register it with no response serializer) and counted in ``unsent`` until written,
        and it is ended by ``stream_deadlines``; memory is released soon after a stream ends."""
        streams, deadlines, unsent, releaser = self.inference_streams, self.stream_deadlines, self.unsent, self.releaser

        async def bounded(requests: Any, context: grpc.aio.ServicerContext) -> None:
            peer = context.peer()
            try:
                if unsent.holding and (refusal := unsent.refusal(peer)) is not None:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
                await _run_within(streams, "ModelStreamInfer streams", "retry later or send unary calls",
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, context,
                                  lambda: _watched_stream(deadlines, unsent, peer, behavior, serializer, requests,
                                                          context))
            finally:
                # A closed connection ends its streams as if each caller had closed its side, so this cannot
                # tell whether gRPC held a half-sent message for the stream: release after every stream.
                if releaser is not None:
                    releaser.release_soon()

        return bounded


def _count_until_finished(unsent: UnsentAnswers, context: grpc.aio.ServicerContext, size: int) -> None:
    peer = context.peer()
    unsent.hold(peer, size)
    context.add_done_callback(lambda _context: unsent.delivered(peer, size))


async def _watched_stream(deadlines: StreamDeadlines, unsent: UnsentAnswers, peer: str, behavior: Behavior,
                          serializer: Callable[[Any], bytes], requests: Any, context: grpc.aio.ServicerContext) -> None:
    """Run a stream's behavior with its requests and writes watched; end it with a status when it is ended."""
    clock = deadlines.watch(_StreamClock(requests, unsent, peer))
    writer = _CountedWriter(context, serializer, unsent, peer, clock)
    try:
        await _write_all(behavior(clock, writer), writer)
    except (asyncio.CancelledError, _StreamRefused) as exc:
        if isinstance(exc, _StreamRefused):
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        elif clock.ending is not None:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, clock.ending
        else:
            raise  # the caller went away, or the server is stopping
        if clock.writing_since is not None:
            # gRPC is still writing an answer that the caller does not read, and no status can follow it: the
            # handler ends (its waiting answers are freed), and the call with its connection.
            log.info("ModelStreamInfer stream from %s ended without a status: %s", peer, message)
            raise asyncio.CancelledError from None
        await context.abort(code, message)
    finally:
        deadlines.forget()


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
