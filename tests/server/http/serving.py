"""A real server with its HTTP port, on a loop of its own thread, shared by a test module's plain functions;
and a small HTTP client over http.client (no parsing of our own)."""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from convserve_server.app import ConvserveServer, create_server
from tests.conftest import server_config


class Answer:
    """An HTTP answer: status, headers (lower-case names) and body."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = {name.lower(): value for name, value in response.getheaders()}
        self.body = response.read()

    def json(self) -> Any:
        """The body as JSON."""
        return orjson.loads(self.body)


class ServerThread:
    """A started server on its own event loop thread; ``call`` runs a coroutine there."""

    def __init__(self, server: ConvserveServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.port = server.http_port

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        """Run ``coroutine`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 10) -> Answer:
        """One request on a connection of its own."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            return Answer(connection.getresponse())
        finally:
            connection.close()

    def post_json(self, path: str, value: Any, headers: dict[str, str] | None = None) -> Answer:
        """POST ``value`` as JSON."""
        return self.request("POST", path, orjson.dumps(value), {"Content-Type": "application/json", **(headers or {})})


@contextmanager
def running_server(repository: Path, **overrides: object) -> Iterator[ServerThread]:
    """A warmed server on loopback with a free gRPC, metrics and HTTP port, stopped on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="server-loop", daemon=True)
    thread.start()

    async def start() -> ConvserveServer:
        server = await create_server(server_config(repository, **{"http_port": 0, **overrides}))
        await server.start()
        return server

    running = ServerThread(asyncio.run_coroutine_threadsafe(start(), loop).result(60), loop)
    try:
        yield running
    finally:
        if not running.server.stopped:
            running.call(running.server.shutdown(grace_s=5))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
