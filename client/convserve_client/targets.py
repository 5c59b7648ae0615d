"""Where a client connects: one address as given, or several replicas balanced round-robin.

``host:port`` (or any one gRPC target) is used as it is, with gRPC's defaults.  A comma-separated
list ``host:port,host:port`` and a ``dns:`` target (``dns:///name:port``, ``dns://AUTHORITY/name:port``)
name replicas: calls go round-robin to those whose health service says ``readiness`` is SERVING,
keepalive pings find a frozen replica within one to two seconds, and a ``dns:`` name is resolved again
(at most once a second) whenever a connection ends, so that replicas added since are reached.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import Any, Sequence

READINESS_SERVICE = "readiness"
"""The health service name the server reports "warm and not draining" under."""

REPLICA_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    # grpcio watches this name on every connection once the service config asks for it; no channel
    # option is needed (``grpc.inhibit_health_checking`` would turn it off).
    "healthCheckConfig": {"serviceName": READINESS_SERVICE},
}
KEEPALIVE_TIME_MS = 1000
"""A ping after this long without data on a connection; the server permits one every 0.5 s."""
KEEPALIVE_TIMEOUT_MS = 1000
"""A ping unanswered for this long closes the connection and fails its calls as UNAVAILABLE."""
DNS_MIN_REFRESH_MS = 1000
"""Shortest gap between two resolutions of a ``dns:`` name (gRPC's default is 30 s)."""

REPLICA_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.service_config", json.dumps(REPLICA_SERVICE_CONFIG)),
    ("grpc.service_config_disable_resolution", 1),  # a DNS TXT record must not replace the config above
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # grpcio 1.85 waits for a keepalive ping's answer for the ping timeout (60 s by default), not the above.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging a connection that carries no calls
    ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_REFRESH_MS),
)


@dataclass(frozen=True)
class ChannelTarget:
    """A gRPC target and the channel options to open it with."""

    target: str
    options: tuple[tuple[str, Any], ...]
    replicas: bool
    """Whether the target names several replicas (round-robin, health checking, keepalive)."""


def channel_target(address: str, channel_options: Sequence[tuple[str, Any]] = ()) -> ChannelTarget:
    """The target and options for ``address``; ``channel_options`` win over the SDK's own.

    Raises ``ValueError`` for an empty or malformed list, and ``OSError`` if a host name in a
    list does not resolve (a list is resolved once, here; use ``dns:///`` for a name that changes).
    """
    address = address.strip()
    if not address:
        raise ValueError("server address is empty")
    if address.startswith("dns:") or (address.startswith(("ipv4:", "ipv6:")) and "," in address):
        return _replica_target(address, channel_options)
    if "," in address:
        return _replica_target(_address_list_target(address), channel_options)
    return ChannelTarget(address, tuple(channel_options), replicas=False)


def _replica_target(target: str, channel_options: Sequence[tuple[str, Any]]) -> ChannelTarget:
    options = dict(REPLICA_OPTIONS)
    options.update(dict(channel_options))
    return ChannelTarget(target, tuple(options.items()), replicas=True)


def _address_list_target(addresses: str) -> str:
    """``ipv4:a:p,b:p`` (or ``ipv6:[a]:p,...``) for a comma-separated list of ``host:port``."""
    entries = [entry.strip() for entry in addresses.split(",")]
    if not all(entries):
        raise ValueError(f"empty entry in server address list {addresses!r}")
    resolved = [ip_and_port for entry in entries for ip_and_port in _resolve(entry)]
    versions = {ip.version for ip, _ in resolved}
    if len(versions) > 1:
        raise ValueError(f"server address list {addresses!r} mixes IPv4 and IPv6; use one family or a dns:/// name")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in _unique(resolved))
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in _unique(resolved))


def split_host_port(entry: str) -> tuple[str, int]:
    """``("host", port)`` from ``host:port`` or ``[v6 address]:port``; ``ValueError`` otherwise."""
    host, colon, port_text = entry.rpartition(":")
    if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"server address {entry!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"server address {entry!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
    return host, int(port_text)


def _resolve(entry: str) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """An IP address stays as it is; a name becomes its IPv4 addresses, or its IPv6 ones if it has none."""
    host, port = split_host_port(entry)
    try:
        return [(ipaddress.ip_address(host), port)]
    except ValueError:
        pass
    found = [ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    preferred = [ip for ip in found if ip.version == 4] or found
    return [(ip, port) for ip in preferred]


def _unique(items: list[Any]) -> list[Any]:
    return list(dict.fromkeys(items))
