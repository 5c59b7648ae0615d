"""Running the HTTP front end: uvicorn (with httptools) on the gRPC server's own event loop.

uvicorn parses HTTP; what it does not bound, the protocol class here does: the time a connection has to
send a request's headers (uvicorn times only idle keep-alive connections), their size, and the number of
connections (uvicorn's ``limit_concurrency`` would refuse every caller while idle connections fill it;
here a connection beyond the cap has its own request refused with 503 and is closed).  The body's
size and time are bounded by :class:`~convserve_server.http.app.RestApp`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from convserve_server.admission import ConcurrencyLimit
from convserve_server.config import ServerConfig
from convserve_server.core import InferenceCore
from convserve_server.errors import StartupError
from convserve_server.http.app import OVER_CAPACITY, RestApp
from convserve_server.images import ImageDecoder
from convserve_server.metrics import ServerMetrics

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
"""Most bytes of one request's headers; beyond, the connection is closed (nginx allows 4 × 8 KiB by default)."""
BACKLOG = 2048


def _limited_protocol(config: ServerConfig) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the header timeout, header size cap and connection cap of ``config``."""
    header_timeout_s = config.http_header_timeout_s
    max_connections = config.http_max_connections

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        """Closes a connection whose headers are slow or huge; marks the requests of one beyond the cap."""

        _header_timer: asyncio.TimerHandle | None = None
        _header_bytes = 0
        _over_capacity = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            _no_delay(transport)
            self._over_capacity = len(self.connections) > max_connections
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is not None:  # the headers are still incomplete after this chunk
                self._header_bytes += len(data)
                if self._header_bytes > MAX_HEADER_BYTES:
                    log.debug("HTTP: closed a connection that sent over %d bytes of headers", MAX_HEADER_BYTES)
                    self._close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._over_capacity:
                self.scope[OVER_CAPACITY] = True  # type: ignore[literal-required]
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_bytes = 0
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            log.debug("HTTP: closed a connection that sent no whole request headers within %g s", header_timeout_s)
            self._close()

        def _close(self) -> None:
            self._disarm_header_timer()
            if not self.transport.is_closing():
                self.transport.close()

    return LimitedHttpToolsProtocol


def _no_delay(transport: asyncio.Transport) -> None:
    """Send small writes at once: uvicorn writes a response's headers and body separately, and with Nagle's
    algorithm the body waits for the client's delayed ACK of the headers (40 ms on Linux)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _bind(host: str, port: int, shared: bool) -> socket.socket:
    """A listening socket on ``host:port`` (StartupError if it cannot be had); ``shared``: SO_REUSEPORT, for
    ``--workers``."""
    try:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port} (HTTP): {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port} (HTTP): {exc.strerror or exc}") from exc
    return sock


def _tls_options(config: ServerConfig) -> dict[str, Any]:
    """The gRPC server's certificate and key, and its client CA for mutual TLS."""
    if config.tls_cert is None or config.tls_key is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
    if config.tls_client_ca is not None:
        options.update(ssl_ca_certs=str(config.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


class HttpFrontEnd:
    """The HTTP/REST front end of one server: bound when built, serving from :meth:`start` to :meth:`stop`.

    ``admission`` counts calls in progress against ``max_concurrent_rpcs``: give it gRPC's count to share one.
    """

    def __init__(self, config: ServerConfig, core: InferenceCore, metrics: ServerMetrics | None,
                 decoder: ImageDecoder, admission: ConcurrencyLimit) -> None:
        self.app = RestApp(config, core, metrics, decoder, admission)
        self._socket = _bind(config.http_host, config.http_port, shared=config.workers > 1)
        self.port: int = self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, http=_limited_protocol(config), lifespan="off", log_config=None, access_log=False,
            server_header=False, timeout_keep_alive=config.http_keepalive_timeout_s, backlog=BACKLOG,
            **_tls_options(config)))
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Accept connections on the running loop."""
        self._server.config.load()
        self._server.lifespan = self._server.config.lifespan_class(self._server.config)  # "off": does nothing
        await self._server.startup(sockets=[self._socket])
        self._ticker = asyncio.get_running_loop().create_task(self._server.main_loop())  # keeps the Date header

    async def stop(self, timeout_s: float) -> None:
        """Stop accepting, close idle connections, give answers in progress ``timeout_s`` to be sent, stop."""
        if self._ticker is None:
            self._socket.close()
            return
        self._server.should_exit = True
        await self._ticker
        self._server.config.timeout_graceful_shutdown = max(timeout_s, 0.1)
        await self._server.shutdown(sockets=[self._socket])
