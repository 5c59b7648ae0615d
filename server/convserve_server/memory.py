"""Giving the memory of refused calls and large messages back to the operating system.

A refused request can leave its message behind twice over. Python keeps it while it is referenced from a
reference cycle (an exception's traceback holds the frames that hold the request), until the cyclic garbage
collector runs, which it does by object count, not bytes: hundreds of MB can wait for it. And gRPC receives a
message in many small buffers, which glibc keeps in its heaps once freed. So, a moment after the first
refusal or a request of 1 MiB or more, the cycles are collected (about 3 ms on the event loop) and
``malloc_trim`` hands the free pages of every heap back (on a worker thread); at most once per ``delay_s``, so
a stream of them costs one round a second, and an answered small call nothing. Blocks of 1 MiB or more are
kept out of the heaps altogether (see :class:`MemoryReleaser`).
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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has ``malloc_trim``), else None (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        library = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return library if library is not None and hasattr(library, "malloc_trim") else None


class MemoryReleaser:
    """Collects cycles and trims the C heap ``delay_s`` after the first refusal noted since the last round.

    Making one also fixes glibc's mmap threshold at 1 MiB for the process (see ``__init__``).
    """

    def __init__(self, delay_s: float = 1.0) -> None:
        self.delay_s = delay_s
        glibc = _glibc()
        self._trim: Callable[[int], int] | None = glibc.malloc_trim if glibc is not None else None
        if glibc is not None:
            # glibc raises its mmap threshold to the size of each large block freed, up to 32 MiB, so after
            # the first large message every later one lands in a heap, where it fragments what trimming can
            # return. A fixed threshold keeps blocks of 1 MiB and more mapped apart, unmapped when freed.
            glibc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        self._pending = False
        self._again = False

    def release_soon(self) -> None:
        """A refused call or a large message is (about to be) freed: release memory soon.

        Call it from the event loop; it costs a flag test when a round is already due.
        """
        if self._pending:
            self._again = True  # this one's memory may be freed after the round due: one more round then
            return
        self._pending = True
        asyncio.get_running_loop().call_later(self.delay_s, self._release)

    def _release(self) -> None:
        started = time.perf_counter()
        collected = gc.collect()
        log.debug("collected %d objects in %.1f ms", collected, (time.perf_counter() - started) * 1000)
        if self._trim is None:
            self._round_done()
            return
        done = asyncio.get_running_loop().run_in_executor(None, self._trim, 0)
        done.add_done_callback(self._trimmed)

    def _trimmed(self, done: asyncio.Future[int]) -> None:
        if done.exception() is not None:
            log.warning("malloc_trim failed: %s", done.exception())
        self._round_done()

    def _round_done(self) -> None:
        self._pending = False
        if self._again:
            self._again = False
            self.release_soon()
