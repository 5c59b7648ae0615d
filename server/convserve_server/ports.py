"""Is a port free?  Asked before gRPC binds, so that a busy port is our one-line error, in every mode.

``--workers`` servers bind with SO_REUSEPORT, which the kernel also grants beside
another server's SO_REUSEPORT sockets: two of them would share the port, each
answering some connections.  A single server asks too, so that gRPC's own log line
about a failed bind never comes before ours.  The check and the bind are not atomic;
gRPC's bind still fails on a port taken in between.
"""

from __future__ import annotations

import socket

from convserve_server.errors import StartupError


def check_port_free(host: str, port: int) -> None:
    """StartupError, in one line, if anything listens on ``host:port`` (port 0 is always free).

    A plain bind (SO_REUSEADDR only, which ignores TIME_WAIT) fails beside any
    listening socket, SO_REUSEPORT or not, so it is a fair test.
    """
    if port == 0:
        return
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
