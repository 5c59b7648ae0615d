"""What an HTTP handler is given and what it gives back, without the ASGI plumbing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import orjson

from convserve_server.http.errors import OK, Status

JSON_HEADERS = [(b"content-type", b"application/json")]
OFF_LOOP_BYTES = 256 * 1024
"""A body this large is inflated and parsed on a worker thread, so that the loop keeps serving meanwhile: 256 KiB
of JSON tensors take about 2 ms to parse into float32 on the development machine, 30 times what a hand-off to a
thread costs (64 µs); docs/http.md has the figures."""

Parsed = TypeVar("Parsed")


@dataclass(frozen=True)
class Call:
    """One request: the path's parameters (``name``, ``version``), the query, the headers (lower-case names,
    the last value of each) and the whole body, decompressed."""

    params: dict[str, str]
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Reply:
    """One answer: body, status and the headers that describe the body."""

    body: bytes
    status: Status = OK
    headers: list[tuple[bytes, bytes]] = field(default_factory=lambda: list(JSON_HEADERS))


def json_reply(value: Any, status: Status = OK) -> Reply:
    """``value`` as a JSON answer."""
    return Reply(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY), status)


async def off_loop_if_large(size: int, parse: Callable[..., Parsed], *args: Any) -> Parsed:
    """``parse(*args)``: on a worker thread for a body of :data:`OFF_LOOP_BYTES` or more, else here."""
    if size >= OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse, *args)
    return parse(*args)
