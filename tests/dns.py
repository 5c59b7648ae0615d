"""A tiny DNS responder on loopback UDP: the A records of one name, from a list a test can change.

It plays a Kubernetes headless Service for gRPC's ``dns://127.0.0.1:PORT/NAME:PORT`` targets.
"""

from __future__ import annotations

import socketserver
import struct
import threading
from typing import Sequence

A, AAAA = 1, 28
_FLAGS_ANSWER = 0x8400  # a response, authoritative
_NXDOMAIN = 3
_NOTIMP = 4


def parse_question(packet: bytes) -> tuple[int, str, int, bytes]:
    """The query's id, its first question's name and type, and the question's bytes as sent."""
    query_id, _flags, questions = struct.unpack("!HHH", packet[:6])
    if questions < 1:
        raise ValueError("no question")
    labels, offset = [], 12
    while packet[offset]:
        length = packet[offset]
        labels.append(packet[offset + 1:offset + 1 + length].decode("ascii").lower())
        offset += 1 + length
    qtype, _qclass = struct.unpack("!HH", packet[offset + 1:offset + 5])
    return query_id, ".".join(labels), qtype, packet[12:offset + 5]


def answer(packet: bytes, name: str, addresses: Sequence[str], ttl_s: int = 0) -> bytes:
    """The reply to ``packet``: its A question for ``name`` gets ``addresses``, AAAA an empty answer."""
    try:
        query_id, asked, qtype, question = parse_question(packet)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError):
        return struct.pack("!HHHHHH", int.from_bytes(packet[:2] or b"\0\0", "big"), _FLAGS_ANSWER | _NOTIMP,
                           0, 0, 0, 0)
    if asked != name.lower().rstrip("."):
        return struct.pack("!HHHHHH", query_id, _FLAGS_ANSWER | _NXDOMAIN, 1, 0, 0, 0) + question
    records = [
        struct.pack("!HHHIH", 0xC00C, A, 1, ttl_s, 4) + bytes(int(part) for part in address.split("."))
        for address in (addresses if qtype == A else ())
    ]
    return struct.pack("!HHHHHH", query_id, _FLAGS_ANSWER, 1, len(records), 0, 0) + question + b"".join(records)


class DnsResponder:
    """Answers A queries for ``name`` with :attr:`addresses` on ``127.0.0.1:port``; a context manager."""

    def __init__(self, name: str, addresses: Sequence[str] = ()) -> None:
        self.name = name
        self.addresses: list[str] = list(addresses)
        """The A records served now; assign a new list to move the name."""
        self.queries = 0
        """Queries answered so far."""
        responder = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                packet, sock = self.request
                sock.sendto(responder.reply(packet), self.client_address)

        self._server = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="dns-responder", daemon=True)

    def reply(self, packet: bytes) -> bytes:
        """The answer to one query packet, from the addresses served now."""
        self.queries += 1
        return answer(packet, self.name, list(self.addresses))

    def target(self, port: int) -> str:
        """The gRPC target that resolves :attr:`name` through this responder."""
        return f"dns://127.0.0.1:{self.port}/{self.name}:{port}"

    def __enter__(self) -> DnsResponder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
