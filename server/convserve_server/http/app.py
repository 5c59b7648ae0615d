"""The ASGI application: routing, the token, body limits and decompression, CORS, the shutdown gate, the
admission count, metrics, and the one translation of errors into answers (:mod:`.errors`).

No framework: a table of routes over the handlers of :mod:`.oip`, :mod:`.classify` and :mod:`.pages`, so
that a request costs the loop little more than uvicorn's parsing and the model call.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import zlib
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl

from convserve_server.admission import ConcurrencyLimit
from convserve_server.config import ServerConfig
from convserve_server.core import InferenceCore
from convserve_server.errors import Overloaded
from convserve_server.http.classify import ClassifyEndpoint
from convserve_server.http.errors import (
    CLIENT_CLOSED, FORBIDDEN, INTERNAL, METHOD_NOT_ALLOWED, NOT_FOUND, OK, REQUEST_TIMEOUT, TOO_LARGE,
    UNAUTHENTICATED, UNAVAILABLE, UNSUPPORTED_MEDIA, BAD_REQUEST, HttpError, Status, message_for, status_for,
)
from convserve_server.http.messages import Call, Reply, json_reply, off_loop_if_large
from convserve_server.http.oip import OipEndpoints
from convserve_server.http.pages import Pages
from convserve_server.http.tensors import whole_number
from convserve_server.images import ImageDecoder
from convserve_server.metrics import ServerMetrics

log = logging.getLogger(__name__)

Handler = Callable[[Call], Awaitable[Reply]]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

OVER_CAPACITY = "convserve.over_capacity"
"""Scope key the protocol sets on the requests of a connection beyond ``http_max_connections``."""
EXPOSED_HEADERS = b"inference-header-content-length"
CORS_MAX_AGE_S = b"600"
NAME = r"(?P<name>[^/]+)"
VERSIONED = NAME + r"(?:/versions/(?P<version>[^/]+))?"


@dataclass(frozen=True)
class Route:
    """An endpoint: its method and path, its handler, and how it is admitted.

    ``method_name`` is what it is counted as in the metrics (gRPC's method names; empty: not counted);
    ``open``: no token needed; ``gated``: runs in an admission slot (``max_concurrent_rpcs``) and under the
    shutdown gate; ``reads_body``: its body is read (else left unread)."""

    method: str
    pattern: re.Pattern[str]
    handler: Handler
    method_name: str = ""
    open: bool = False
    gated: bool = True
    reads_body: bool = False


def _route(method: str, path: str, handler: Handler, **options: Any) -> Route:
    return Route(method, re.compile(path + r"\Z"), handler, **options)


def build_routes(oip: OipEndpoints, classify: ClassifyEndpoint, pages: Pages) -> list[Route]:
    """Every endpoint of the HTTP API (docs/http.md and the OpenAPI document describe them)."""
    model = r"/v2/models/" + VERSIONED
    return [
        _route("GET", r"/v2/health/live", oip.server_live, open=True, gated=False),
        _route("GET", r"/v2/health/ready", oip.server_ready, open=True, gated=False),
        _route("GET", r"/v2", oip.server_metadata, method_name="ServerMetadata"),
        _route("GET", r"/v2/models/stats", oip.model_statistics, method_name="ModelStatistics"),
        _route("GET", model, oip.model_metadata, method_name="ModelMetadata"),
        _route("GET", model + r"/ready", oip.model_ready, method_name="ModelReady"),
        _route("POST", model + r"/infer", oip.infer, method_name="ModelInfer", reads_body=True),
        _route("POST", model + r"/classify", classify.classify, method_name="Classify", reads_body=True),
        _route("GET", model + r"/config", oip.model_config, method_name="ModelConfig"),
        _route("GET", model + r"/stats", oip.model_statistics, method_name="ModelStatistics"),
        _route("POST", r"/v2/repository/index", oip.repository_index, method_name="RepositoryIndex", reads_body=True),
        _route("POST", r"/v2/repository/models/" + NAME + r"/load", oip.repository_load,
               method_name="RepositoryModelLoad", reads_body=True),
        _route("POST", r"/v2/repository/models/" + NAME + r"/unload", oip.repository_unload,
               method_name="RepositoryModelUnload", reads_body=True),
        _route("GET", r"/v2/openapi.json", pages.openapi, open=True, gated=False),
        _route("GET", r"/v2/docs", pages.docs, open=True, gated=False),
        _route("GET", r"/v2/docs/(?P<file>[^/]+)", pages.docs_asset, open=True, gated=False),
        _route("GET", r"/", pages.index, open=True, gated=False),
        _route("GET", r"/static/(?P<file>[^/]+)", pages.static, open=True, gated=False),
    ]


def parse_origins(setting: str) -> frozenset[str]:
    """The origins of ``--cors-origins``: comma-separated, ``*`` for any, empty for none."""
    return frozenset(origin.strip().rstrip("/") for origin in setting.split(",") if origin.strip())


class RestApp:
    """The ASGI application of the HTTP front end; see the module docstring."""

    def __init__(self, config: ServerConfig, core: InferenceCore, metrics: ServerMetrics | None,
                 decoder: ImageDecoder, admission: ConcurrencyLimit) -> None:
        self.core = core
        self.metrics = metrics
        self.admission = admission
        self.routes = build_routes(OipEndpoints(core), ClassifyEndpoint(core, decoder), Pages())
        self._token = config.auth_token.get_secret_value().encode() if config.auth_token is not None else None
        self._origins = parse_origins(config.cors_origins)
        self._max_body = config.http_max_body_bytes
        self._max_decompressed = config.http_max_decompressed_bytes
        self._receive_timeout_s = config.receive_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        started = time.monotonic()
        headers = _headers(scope)
        route: Route | None = None
        params: dict[str, str] = {}
        # A body left unread must not be read as the next request, nor keep the connection open while it
        # trickles in (each byte would restart uvicorn's keep-alive timer): the connection closes after the answer.
        closing = declares_body(headers)
        try:
            if scope.get(OVER_CAPACITY):
                closing = True
                raise HttpError(UNAVAILABLE, "too many connections to this server; retry later")
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                await self._send(send, self._preflight(headers), headers, closing)
                return
            route, params = self._match(scope["method"], scope["path"])
            if not route.open:
                self._check_token(headers)
            body = b""
            if route.reads_body:
                body = await self._read_body(headers, receive)
                closing = False
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            work = self._run(route, Call(params, query, headers, body))
            # Once its body is read, a model call is cancelled if its caller goes away (as gRPC cancels a call).
            reply = await (_unless_disconnected(work, receive) if route.reads_body else work)
        except Exception as exc:
            reply = self._error_reply(exc, route)
            # A body left unsent (or inflated in part) must not be read as the next request, nor keep uploading.
            closing = closing or reply.status in (TOO_LARGE, UNAUTHENTICATED, REQUEST_TIMEOUT)
        if route is not None and route.method_name:
            self._count(route, params, reply.status, started)
        await self._send(send, reply, headers, closing)

    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed = []
        for route in self.routes:
            found = route.pattern.match(path)
            if found is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, {key: value for key, value in found.groupdict().items() if value is not None}
            allowed.append(route.method)
        if allowed:
            raise HttpError(METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}; use {', '.join(allowed)}")
        raise HttpError(NOT_FOUND, f"no endpoint {path}; see /v2/docs")

    def _check_token(self, headers: dict[str, str]) -> None:
        if self._token is None:
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(" ").encode(), self._token):
            raise HttpError(UNAUTHENTICATED, "missing or wrong bearer token in the Authorization header")

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes:
        """The whole body, under the size cap (413 before reading past it) and the receive timeout, inflated."""
        declared = whole_number(headers.get("content-length", ""))
        if declared is not None and declared > self._max_body:
            raise HttpError(TOO_LARGE, f"the body is {declared:,} bytes, over the limit of {self._max_body:,} "
                            "(--http-max-body-bytes)")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self._receive_timeout_s):
                more = True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise HttpError(BAD_REQUEST, "the caller went away before sending its whole body")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self._max_body:
                        raise HttpError(TOO_LARGE, f"the body is over the limit of {self._max_body:,} bytes "
                                        "(--http-max-body-bytes)")
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            raise HttpError(REQUEST_TIMEOUT, f"the request body did not arrive within {self._receive_timeout_s:g} s "
                            "of its headers") from None
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return await self._inflate(body, headers.get("content-encoding", "").strip().lower())

    async def _inflate(self, body: bytes, encoding: str) -> bytes:
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise HttpError(UNSUPPORTED_MEDIA, f"Content-Encoding {encoding!r:.64} is not supported; send gzip, "
                            "deflate or identity")
        wbits = 16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS
        return await off_loop_if_large(len(body), self._decompress, body, wbits, encoding)

    def _decompress(self, body: bytes, wbits: int, encoding: str) -> bytes:
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(body, self._max_decompressed + 1)  # stops there: no bomb is inflated whole
        except zlib.error as exc:
            raise HttpError(BAD_REQUEST, f"the {encoding} body is corrupt: {exc}") from None
        if len(data) > self._max_decompressed:
            raise HttpError(TOO_LARGE, f"the {encoding} body inflates past the limit of {self._max_decompressed:,} "
                            "bytes (--http-max-decompressed-bytes)")
        if not inflater.eof:
            raise HttpError(BAD_REQUEST, f"the {encoding} body is truncated")
        return data

    async def _run(self, route: Route, call: Call) -> Reply:
        """The handler in an admission slot and under the shutdown gate, as a gRPC call runs."""
        if not route.gated:
            return await route.handler(call)
        admission = self.admission
        if not admission.try_enter():
            raise Overloaded(f"server busy: {admission.limit} calls in progress; retry later")
        try:
            async with self.core.shutdown_gate.call(None):
                return await route.handler(call)
        finally:
            admission.leave()

    def _error_reply(self, error: Exception, route: Route | None) -> Reply:
        status = status_for(error)
        if status is INTERNAL:
            log.error("HTTP %s failed", route.method_name if route else "request", exc_info=error)
        reply = json_reply({"error": message_for(error)}, status)
        if status is UNAUTHENTICATED:
            reply.headers.append((b"www-authenticate", b'Bearer realm="convserve"'))
        return reply

    def _count(self, route: Route, params: dict[str, str], status: Status, started: float) -> None:
        if self.metrics is None:
            return
        name = params.get("name") or self.core.default_model
        model = name if self.core.serves(name) else "unknown"
        self.metrics.record_request(model, route.method_name, status.code, time.monotonic() - started)

    def _allowed_origin(self, headers: dict[str, str]) -> str | None:
        origin = headers.get("origin")
        if origin is None or not self._origins:
            return None
        return origin if "*" in self._origins or origin.rstrip("/") in self._origins else None

    def _preflight(self, headers: dict[str, str]) -> Reply:
        origin = self._allowed_origin(headers)
        if origin is None:
            return json_reply({"error": f"CORS: origin {headers.get('origin', '(none)')!r:.80} may not call this "
                               "server from a browser (--cors-origins)"}, FORBIDDEN)
        requested = headers.get("access-control-request-headers", "authorization, content-type")
        return Reply(b"", Status(204, OK.code), [
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", requested.encode("latin-1")),
            (b"access-control-max-age", CORS_MAX_AGE_S),
        ])

    async def _send(self, send: Send, reply: Reply, headers: dict[str, str], closing: bool) -> None:
        response_headers = [*reply.headers, (b"content-length", str(len(reply.body)).encode())]
        origin = self._allowed_origin(headers)
        if origin is not None:
            response_headers += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                                 (b"access-control-expose-headers", EXPOSED_HEADERS)]
        if closing:
            response_headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": reply.status.http, "headers": response_headers})
        await send({"type": "http.response.body", "body": reply.body})


async def _unless_disconnected(work: Awaitable[Reply], receive: Receive) -> Reply:
    """``work``'s reply; if the caller disconnects first, ``work`` is cancelled (a decode stops, a queued request
    leaves the batcher) and the caller, gone, is counted as CANCELLED.  One watcher task, which cancels this
    one: cheaper than running ``work`` as a task of its own beside it."""
    task = asyncio.current_task()
    assert task is not None
    caller = _Caller()
    watcher = asyncio.get_running_loop().create_task(caller.cancel_when_gone(receive, task))
    try:
        return await work
    except asyncio.CancelledError:
        if not caller.gone:
            raise
        task.uncancel()
        return json_reply({"error": "the caller went away; the call was cancelled"}, CLIENT_CLOSED)
    finally:
        watcher.cancel()


class _Caller:
    """Whether the caller of a call in progress went away."""

    gone = False

    async def cancel_when_gone(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` when the caller disconnects (once the body is read, ``receive`` has nothing else)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        task.cancel()


def declares_body(headers: dict[str, str]) -> bool:
    """Whether a request says a body follows: a Content-Length other than 0, or a Transfer-Encoding."""
    return headers.get("content-length", "0").strip() != "0" or "transfer-encoding" in headers


def _headers(scope: Scope) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
