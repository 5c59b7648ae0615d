"""Counts of calls in progress that refuse entry beyond a bound: in all, and per peer host.

Protocol-free: the gRPC handlers and any other front end count their calls in the same instances.
"""

from __future__ import annotations

from collections import Counter


class ConcurrencyLimit:
    """A count of calls in progress that refuses entry beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_progress = 0

    def try_enter(self) -> bool:
        """Take a slot if one is free."""
        if self.in_progress >= self.limit:
            return False
        self.in_progress += 1
        return True

    def leave(self) -> None:
        """Give a slot back."""
        self.in_progress -= 1


class PeerLimit:
    """Calls in progress, bounded in total and per peer host (the peer's address without its port)."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.total = total
        self.per_peer = per_peer
        self._by_peer: Counter[str] = Counter()
        self.in_progress = 0

    def try_enter(self, peer: str) -> bool:
        """Take a slot for ``peer`` if the total and its own share allow."""
        if self.in_progress >= self.total or self._by_peer[peer] >= self.per_peer:
            return False
        self._by_peer[peer] += 1
        self.in_progress += 1
        return True

    def leave(self, peer: str) -> None:
        """Give ``peer``'s slot back."""
        self.in_progress -= 1
        self._by_peer[peer] -= 1
        if not self._by_peer[peer]:
            del self._by_peer[peer]


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.1:5000`` → ``ipv4:10.0.0.1``; ``ipv6:[::1]:5000`` → ``ipv6:[::1]``."""
    host, separator, port = peer.rpartition(":")
    return host if separator and port.isdigit() else peer
