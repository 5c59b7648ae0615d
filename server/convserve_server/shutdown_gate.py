"""Which calls may start work, and knowing when every admitted one has returned: the last stage of a drain.

Until :meth:`ShutdownGate.close`, every call is admitted and counted while its handler runs.  After it,
a new call is *held*: it does no work and waits for :meth:`ShutdownGate.release`, then is refused
(ModelNotReady, so UNAVAILABLE).  Holding rather than refusing at once matters to callers in a
closed loop: a caller whose call is held sends no other, so when the transport is stopped nothing of
theirs is caught half-accepted (gRPC cancels calls that reach it while it shuts down, and a caller
cannot safely retry a CANCELLED it did not cause).  The server releases the held calls once the
transport has told its clients to go away.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager

from convserve_server.errors import ModelNotReady

REFUSAL = "server is shutting down; not accepting new requests"
SETTLE_POLL_S = 0.01
DEADLINE_MARGIN_S = 0.1
"""A held call is refused this long before its caller's deadline, if the release has not come by then."""


class ShutdownGate:
    """Admits calls until closed; then holds new ones until released and refuses them."""

    def __init__(self) -> None:
        self._open = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._released = asyncio.Event()
        self._held = 0
        self._last_held_at = 0.0

    @property
    def in_flight(self) -> int:
        """Admitted calls whose handlers have not returned."""
        return self._in_flight

    @property
    def held(self) -> int:
        """Calls that arrived after :meth:`close`, waiting to be refused."""
        return self._held

    def call(self, deadline: float | None = None) -> AbstractAsyncContextManager[None]:
        """Wrap one call's handler (``async with gate.call(deadline):``): runs it if admitted; once closed, waits
        for the release (or until shortly before the caller's ``deadline``, a ``time.monotonic()`` instant) and
        raises ModelNotReady without running it."""
        if not self._open:
            return _Held(self, deadline)
        self._in_flight += 1
        self._idle.clear()
        return _Admitted(self)

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def _hold(self, deadline: float | None) -> None:
        self._held += 1
        self._last_held_at = time.monotonic()
        timeout = None if deadline is None else max(deadline - self._last_held_at - DEADLINE_MARGIN_S, 0)
        try:
            await asyncio.wait_for(self._released.wait(), timeout)
        except TimeoutError:
            pass  # refused before the caller's deadline: UNAVAILABLE, which it can retry, not DEADLINE_EXCEEDED
        finally:
            self._held -= 1

    def close(self) -> None:
        """Admit no new call: from now on they are held (see the module docstring)."""
        if self._open:
            self._open = False
            self._last_held_at = time.monotonic()

    async def wait_idle(self) -> None:
        """Return once every admitted call's handler has returned."""
        await self._idle.wait()

    async def wait_settled(self, quiet_s: float) -> None:
        """Return once no new call has been held for ``quiet_s`` seconds (callers in a closed loop are then all
        waiting on a held call).  Bound it with a timeout: callers that never pause never settle."""
        while (waited := time.monotonic() - self._last_held_at) < quiet_s:
            await asyncio.sleep(max(quiet_s - waited, SETTLE_POLL_S))

    def release(self) -> None:
        """Refuse every held call now, and every later one at once."""
        self._released.set()


class _Admitted(AbstractAsyncContextManager[None]):
    """An admitted call's time in the gate: counted until its handler returns.  A class rather than a generator
    context manager: it is entered on every call."""

    __slots__ = ("_gate",)

    def __init__(self, gate: ShutdownGate) -> None:
        self._gate = gate

    async def __aexit__(self, *exc_info: object) -> None:
        self._gate._leave()


class _Held(AbstractAsyncContextManager[None]):
    """A call that arrived after the gate closed: held, then refused before its handler runs."""

    __slots__ = ("_gate", "_deadline")

    def __init__(self, gate: ShutdownGate, deadline: float | None) -> None:
        self._gate = gate
        self._deadline = deadline

    async def __aenter__(self) -> None:
        await self._gate._hold(self._deadline)
        raise ModelNotReady(REFUSAL)

    async def __aexit__(self, *exc_info: object) -> None:
        return None
