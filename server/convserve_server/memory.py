"""Giving memory freed after refused calls back to the operating system.

gRPC receives a message in many small buffers. Once freed, glibc keeps them in its heaps, and a burst of
large requests that are refused would leave the process hundreds of MB larger for good. ``malloc_trim``
returns the free pages of every heap; it runs on a worker thread, a moment after refusals, at most once per
interval, so a stream of refusals costs one trim a second, and an ordinary call nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from typing import Callable

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


class MemoryReleaser:
    """Trims the C heap ``delay_s`` after the first refusal noted since the last trim."""

    def __init__(self, delay_s: float = 1.0) -> None:
        self.delay_s = delay_s
        self._trim = _malloc_trim()
        self._pending = False

    def note_refusal(self) -> None:
        """A call was refused after gRPC may have received part of it: trim soon (from the event loop)."""
        if self._pending or self._trim is None:
            return
        self._pending = True
        asyncio.get_running_loop().call_later(self.delay_s, self._start_trim)

    def _start_trim(self) -> None:
        trim = self._trim
        assert trim is not None
        done = asyncio.get_running_loop().run_in_executor(None, trim, 0)
        done.add_done_callback(self._trimmed)

    def _trimmed(self, done: asyncio.Future[int]) -> None:
        self._pending = False
        if done.exception() is not None:
            log.warning("malloc_trim failed: %s", done.exception())
