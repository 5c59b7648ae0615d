"""What an HTTP handler is given and what it gives back, without the ASGI plumbing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from convserve_server.http.errors import OK, Status

JSON_HEADERS = [(b"content-type", b"application/json")]


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
