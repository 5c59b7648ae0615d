"""Whether a server is reachable from other machines with neither a token nor TLS: worth one warning line."""

from __future__ import annotations

import ipaddress
import logging

from convserve_server.config import ServerConfig

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) can only be reached from this machine."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def exposure_warning(config: ServerConfig, port: int, http_port: int | None = None) -> str | None:
    """The warning for a server whose gRPC ``port`` (or HTTP ``http_port``, if open) listens beyond loopback
    without a token or TLS, else None."""
    if config.auth_token is not None or config.tls_cert is not None:
        return None
    exposed = [f"{kind} {host}:{number}" for kind, host, number in
               (("gRPC", config.host, port), ("HTTP", config.http_host, http_port))
               if number is not None and not is_loopback(host)]
    if not exposed:
        return None
    return (f"listening on {' and '.join(exposed)} with no --auth-token and no TLS: anyone who can reach it can call "
            f"every model and the repository API (--host/--http-host 127.0.0.1 keep it on this machine)")


def warn_if_exposed(config: ServerConfig, port: int, log: logging.Logger, http_port: int | None = None) -> None:
    """Log :func:`exposure_warning` as one WARNING line, if there is one."""
    warning = exposure_warning(config, port, http_port)
    if warning is not None:
        log.warning("%s", warning)
