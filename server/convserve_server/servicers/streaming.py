"""Answering a bidirectional stream of requests: several at once, each answer written as soon as it is ready."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc.aio

IN_FLIGHT_PER_STREAM = 32
"""Requests of one stream read and not yet answered; the next is read when one is answered, so a caller that
sends faster than it is answered is held back by HTTP/2 flow control, not buffered here."""

Request = TypeVar("Request")


async def answer_each(requests: AsyncIterator[Request], context: grpc.aio.ServicerContext,
                      answer: Callable[[Request], Awaitable[Any]], in_flight: int = IN_FLIGHT_PER_STREAM) -> None:
    """Write ``answer(request)`` for every request of the stream, in the order the answers are ready.

    ``answer`` must turn a request's failure into an answer of its own. Returns once the caller has ended its
    side of the stream and every answer is written; if the caller goes away first, the unanswered requests
    are cancelled.
    """
    slots = asyncio.Semaphore(in_flight)
    writing = asyncio.Lock()  # one write at a time on a call
    pending: set[asyncio.Task[None]] = set()
    write_errors: list[BaseException] = []  # a write fails only when the call is broken

    def finished(task: asyncio.Task[None]) -> None:
        pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            write_errors.append(task.exception())  # type: ignore[arg-type]

    async def answer_one(request: Request) -> None:
        try:
            response = await answer(request)
            async with writing:
                await context.write(response)
        finally:
            slots.release()

    incoming = aiter(requests)
    try:
        while True:
            await slots.acquire()  # before reading: a request read is a request computing or written
            try:
                request = await anext(incoming)
            except StopAsyncIteration:
                break
            task = asyncio.ensure_future(answer_one(request))
            pending.add(task)
            task.add_done_callback(finished)
        if pending:
            await asyncio.wait(pending)
        if write_errors:
            raise write_errors[0]
    finally:
        for task in pending:
            task.cancel()
