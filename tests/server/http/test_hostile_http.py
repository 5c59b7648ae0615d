"""Hostile HTTP callers, each refused with its status while an authenticated caller is still answered: no or a
wrong token, bodies over the cap (declared or chunked), gzip bombs, slow or huge headers, slow bodies, too many
connections, too many calls, and browsers of origins not allowed."""

from __future__ import annotations

import gzip
import http.client
import select
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import orjson
import pytest

from tests.models import write_version
from tests.server.test_decode_limits import many_scan_jpeg
from tests.server.http.serving import Answer, ServerThread, running_server

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 64 * 1024
MAX_INFLATED = 256 * 1024
HEADER_TIMEOUT_S = 1.0
RECEIVE_TIMEOUT_S = 1.0
HOLD_S = 2.0
KEEPALIVE_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 6
ALLOWED_ORIGIN = "https://app.example"
REQUEST = orjson.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 8, 8, 3], "data": [0.5] * 192}]})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repository = tmp_path_factory.mktemp("http-hostile") / "models"
    write_version(repository, "tiny", 1)
    with running_server(repository, auth_token=TOKEN, http_max_body_bytes=MAX_BODY,
                        http_max_decompressed_bytes=MAX_INFLATED, http_header_timeout_s=HEADER_TIMEOUT_S,
                        receive_timeout_s=RECEIVE_TIMEOUT_S, http_keepalive_timeout_s=KEEPALIVE_TIMEOUT_S,
                        http_max_connections=MAX_CONNECTIONS,
                        cors_origins=ALLOWED_ORIGIN) as server:
        yield server


def infer(served: ServerThread, body: bytes = REQUEST, headers: dict[str, str] | None = None) -> Answer:
    return served.request("POST", "/v2/models/tiny/infer", body, {"Content-Type": "application/json", **AUTH,
                                                                  **(headers or {})})


def assert_answered(served: ServerThread) -> None:
    """An authenticated caller gets its inference."""
    answer = infer(served)
    assert answer.status == 200, answer.body
    assert len(answer.json()["outputs"][0]["data"]) == 4


def raw_connection(served: ServerThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", served.port), timeout=10)


def read_until_closed(connection: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (an error if it does not within ``timeout``)."""
    connection.settimeout(timeout)
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except ConnectionResetError:  # closed with our bytes unread: the kernel resets instead
        pass
    return received


def test_without_the_token_401_and_health_and_the_page_stay_open(served):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        refused = served.request("POST", "/v2/models/tiny/infer", REQUEST, headers)
        assert refused.status == 401 and "token" in refused.json()["error"]
        assert refused.headers["www-authenticate"].startswith("Bearer")
    assert served.request("GET", "/v2/models/tiny").status == 401
    assert served.request("GET", "/v2/health/ready").status == 200
    assert served.request("GET", "/").status == 200
    assert infer(served, headers={"Authorization": f"bearer {TOKEN}"}).status == 200  # the scheme is any case
    assert_answered(served)


def test_a_declared_body_over_the_cap_is_413_before_it_is_read(served):
    with raw_connection(served) as connection:
        connection.sendall(f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {100 * MAX_BODY}\r\n\r\n".encode())
        answer = read_until_closed(connection)  # answered and closed with no byte of the body sent
    assert answer.startswith(b"HTTP/1.1 413 ") and b"--http-max-body-bytes" in answer
    assert_answered(served)


def test_a_chunked_body_over_the_cap_is_413(served):
    chunk = b"x" * 16384
    with raw_connection(served) as connection:
        connection.sendall(f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                           "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(3 * MAX_BODY // len(chunk)):
            if select.select([connection], [], [], 0.05)[0]:
                break  # answered early, as curl notices: stop sending
            connection.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        answer = read_until_closed(connection)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"over the limit" in answer
    assert_answered(served)


def test_gzip_bodies_are_inflated_under_a_cap_and_bad_encodings_refused(served):
    answered = infer(served, gzip.compress(REQUEST), {"Content-Encoding": "gzip"})
    assert answered.status == 200, answered.body
    bomb = gzip.compress(b" " * (64 * MAX_INFLATED))
    assert len(bomb) < MAX_BODY
    inflated = infer(served, bomb, {"Content-Encoding": "gzip"})
    assert inflated.status == 413 and "--http-max-decompressed-bytes" in inflated.json()["error"]
    corrupt = infer(served, b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"})
    assert corrupt.status == 400 and "gzip" in corrupt.json()["error"]
    truncated = infer(served, zlib.compress(REQUEST)[:-8], {"Content-Encoding": "deflate"})
    assert truncated.status == 400 and "truncated" in truncated.json()["error"]
    brotli = infer(served, REQUEST, {"Content-Encoding": "br"})
    assert brotli.status == 415 and "gzip, deflate or identity" in brotli.json()["error"]
    assert_answered(served)


def test_slow_headers_are_cut_off_at_the_header_timeout(served):
    with raw_connection(served) as silent, raw_connection(served) as slow:
        slow.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        started = time.monotonic()
        assert_answered(served)  # meanwhile
        assert read_until_closed(slow) == b"" and read_until_closed(silent) == b""
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 3


def test_huge_headers_close_the_connection(served):
    with raw_connection(served) as connection:
        started = time.monotonic()
        connection.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(20):
                connection.sendall(b"X-Filler: " + b"a" * 8000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: what we wanted
        assert b" 200 " not in read_until_closed(connection)
        assert time.monotonic() - started < HEADER_TIMEOUT_S  # closed for the size, before the header timeout
    assert_answered(served)


def test_a_slow_body_is_408(served):
    with raw_connection(served) as connection:
        connection.sendall(f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {len(REQUEST)}\r\n\r\n".encode()
                           + REQUEST[:10])
        assert_answered(served)  # meanwhile
        answer = read_until_closed(connection)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 s" in answer


@pytest.mark.parametrize("request_head", [
    b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
    b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n",
    b"GET /v3/absent HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
])
def test_a_body_no_endpoint_reads_does_not_keep_the_connection_open(served, request_head):
    """Answered, then closed: a body trickled in afterwards, a byte every 0.2 s, would otherwise keep restarting
    uvicorn's keep-alive timer, and open connections, no token needed, would fill --http-max-connections."""
    with raw_connection(served) as connection:
        connection.sendall(request_head)
        connection.settimeout(0.2)
        received = b""
        give_up = time.monotonic() + KEEPALIVE_TIMEOUT_S + HEADER_TIMEOUT_S + RECEIVE_TIMEOUT_S + 3
        while True:
            assert time.monotonic() < give_up, f"still open; received {received[:80]!r}"
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                try:
                    connection.sendall(b"x")
                except (BrokenPipeError, ConnectionResetError):
                    break
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    assert received.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 404 ")) and b"connection: close" in received.lower()
    assert_answered(served)


def test_connections_beyond_the_cap_get_503_while_open_ones_are_answered(tmp_path):
    write_version(tmp_path / "models", "tiny", 1)
    # The idle connections must outlast the filling of the cap, however loaded the machine: a long header timeout.
    with running_server(tmp_path / "models", http_max_connections=MAX_CONNECTIONS, http_header_timeout_s=60) as served:
        kept = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        kept.request("GET", "/v2/health/live")
        assert Answer(kept.getresponse()).status == 200
        with ExitStack() as stack:
            for _ in range(MAX_CONNECTIONS):
                stack.enter_context(raw_connection(served))
            # The server accepts connections in the order they came, so this one is made after all of those.
            refused = served.request("GET", "/v2/health/live")
            assert refused.status == 503 and "too many connections" in refused.json()["error"]
            kept.request("POST", "/v2/models/tiny/infer", REQUEST, {"Content-Type": "application/json"})
            assert Answer(kept.getresponse()).status == 200  # a connection within the cap is still answered
        kept.close()


def test_calls_beyond_max_concurrent_rpcs_are_429(tmp_path):
    """One slot, held by a real call: a classify of a JPEG that decodes for half a minute, stopped at the
    decode timeout."""
    write_version(tmp_path / "models", "tiny", 1)
    hostile = many_scan_jpeg(4000, 3000)
    with running_server(tmp_path / "models", max_concurrent_rpcs=1, decode_timeout_s=HOLD_S) as served:
        held: list[Answer] = []
        holder = threading.Thread(target=lambda: held.append(served.request(
            "POST", "/v2/models/tiny/classify", hostile, {"Content-Type": "image/jpeg"}, timeout=30)))
        holder.start()
        deadline = time.monotonic() + 10
        while not served.server.decoder.decode_process_ids():  # the classify decodes, in its slot
            assert time.monotonic() < deadline, "the classify never started decoding"
            time.sleep(0.01)
        busy = infer(served)
        assert busy.status == 429 and "server busy: 1 calls in progress" in busy.json()["error"]
        holder.join(30)
        assert held[0].status == 400 and "--decode-timeout-s" in held[0].json()["error"]
        assert_answered(served)


def test_cors_is_for_the_allowed_origins_only(served):
    preflight = {"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = served.request("OPTIONS", "/v2/models/tiny/infer", headers=preflight)
    assert allowed.status == 204
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert allowed.headers["access-control-allow-headers"] == "authorization, content-type"
    stranger = served.request("OPTIONS", "/v2/models/tiny/infer", headers={**preflight, "Origin": "https://evil.example"})
    assert stranger.status == 403 and "access-control-allow-origin" not in stranger.headers
    answered = infer(served, headers={"Origin": ALLOWED_ORIGIN})
    assert answered.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "inference-header-content-length" in answered.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-origin" not in infer(served, headers={"Origin": "https://evil.example"}).headers


def test_cors_is_off_by_default(tmp_path):
    write_version(tmp_path / "models", "tiny", 1)
    with running_server(tmp_path / "models") as server:
        preflight = {"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"}
        assert server.request("OPTIONS", "/v2/models/tiny/infer", headers=preflight).status == 403
        answer = server.request("GET", "/v2", headers={"Origin": ALLOWED_ORIGIN})
        assert answer.status == 200 and "access-control-allow-origin" not in answer.headers
