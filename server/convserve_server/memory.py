"""Giving the memory of refused calls back to the operating system.

A refused request can leave its message behind twice over. Python keeps it while it is referenced from a
reference cycle (an exception's traceback holds the frames that hold the request), until the cyclic garbage
collector runs, which it does by object count, not bytes: hundreds of MB can wait for it. And gRPC receives a
message in many small buffers, which glibc keeps in its heaps once freed. So, a moment after the first
refusal, the cycles are collected (about 3 ms on the event loop) and ``malloc_trim`` hands the free pages of
every heap back (on a worker thread); at most once per ``delay_s``, so a stream of refusals costs one round a
second, and an answered call nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
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
    """Collects cycles and trims the C heap ``delay_s`` after the first refusal noted since the last round."""

    def __init__(self, delay_s: float = 1.0) -> None:
        self.delay_s = delay_s
        self._trim = _malloc_trim()
        self._pending = False

    def note_refusal(self) -> None:
        """A call was refused after its request (or part of it) was received: release memory soon.

        Call it from the event loop; it costs a flag test when a round is already due.
        """
        if self._pending:
            return
        self._pending = True
        asyncio.get_running_loop().call_later(self.delay_s, self._release)

    def _release(self) -> None:
        started = time.perf_counter()
        collected = gc.collect()
        log.debug("collected %d objects in %.1f ms", collected, (time.perf_counter() - started) * 1000)
        if self._trim is None:
            self._pending = False
            return
        done = asyncio.get_running_loop().run_in_executor(None, self._trim, 0)
        done.add_done_callback(self._trimmed)

    def _trimmed(self, done: asyncio.Future[int]) -> None:
        self._pending = False
        if done.exception() is not None:
            log.warning("malloc_trim failed: %s", done.exception())
