"""The ``/metrics`` HTTP endpoint: one thread for every connection, each with a deadline.

``prometheus_client.start_http_server`` starts a thread per connection and waits
forever for its request, so idle or half-sent connections pile up threads and slow
every scrape.  Here one thread multiplexes all connections with ``selectors``: a
connection must send its request head within ``timeout_s``, at most
``max_connections`` are open at once (the oldest is closed to make room), and a
request head over 8 KiB is refused.  A scrape is rendered and written in one go.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

MAX_CONNECTIONS = 256
TIMEOUT_S = 5.0
MAX_HEAD_BYTES = 8192


@dataclass
class _Connection:
    sock: socket.socket
    deadline: float
    head: bytearray = field(default_factory=bytearray)


class MetricsHTTPServer:
    """Serves ``registry`` as Prometheus text on ``GET /metrics`` (and ``/``) from one background thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, *,
                 max_connections: int = MAX_CONNECTIONS, timeout_s: float = TIMEOUT_S) -> None:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._registry = registry
        self._max_connections = max_connections
        self._timeout_s = timeout_s
        self._connections: dict[int, _Connection] = {}  # by file descriptor, oldest first
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="convserve-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close every connection."""
        self._stopping.set()
        self._thread.join(timeout=5)
        for connection in list(self._connections.values()):
            self._drop(connection)
        self._selector.close()
        self._listener.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            for key, _ in self._selector.select(timeout=0.2):
                if key.fileobj is self._listener:
                    self._accept()
                elif (connection := self._connections.get(key.fd)) is not None:  # not dropped for room meanwhile
                    self._read(connection)
            self._drop_expired()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, ConnectionError):
            return
        if len(self._connections) >= self._max_connections:
            self._drop(next(iter(self._connections.values())))
        sock.setblocking(False)
        self._connections[sock.fileno()] = _Connection(sock, time.monotonic() + self._timeout_s)
        self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        connection.head += data
        if not data or len(connection.head) > MAX_HEAD_BYTES:
            self._drop(connection)
        elif b"\r\n\r\n" in connection.head or b"\n\n" in connection.head:
            self._respond(connection)

    def _respond(self, connection: _Connection) -> None:
        lines = bytes(connection.head).decode("latin-1").splitlines()
        method, _, rest = lines[0].partition(" ")
        path = rest.split(" ", 1)[0].split("?", 1)[0]
        headers = {name.strip().lower(): value.strip()
                   for name, _, value in (line.partition(":") for line in lines[1:] if ":" in line)}
        if method not in ("GET", "HEAD"):
            reply = _response("405 Method Not Allowed", "text/plain", b"only GET\n")
        elif path not in ("/", "/metrics"):
            reply = _response("404 Not Found", "text/plain", b"not found; try /metrics\n")
        else:
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            body = encoder(self._registry)
            reply = _response("200 OK", content_type, b"" if method == "HEAD" else body, len(body))
        self._selector.unregister(connection.sock)
        try:
            connection.sock.settimeout(self._timeout_s)
            connection.sock.sendall(reply)
        except OSError:
            pass
        self._forget(connection)
        connection.sock.close()

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for connection in [c for c in self._connections.values() if c.deadline <= now]:
            self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        self._selector.unregister(connection.sock)
        self._forget(connection)
        connection.sock.close()

    def _forget(self, connection: _Connection) -> None:
        self._connections.pop(connection.sock.fileno(), None)


def _response(status: str, content_type: str, body: bytes, length: int | None = None) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: "
            f"{len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body
