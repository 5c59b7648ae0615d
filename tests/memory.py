"""Peak resident memory of the test process, for tests that bound what one call may cost."""

from __future__ import annotations

from pathlib import Path

import pytest

MIB = 1024 * 1024


def peak_rss_bytes() -> int:
    """The process's peak resident set size (VmHWM) since it started or since :func:`reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def reset_peak_rss() -> int:
    """Reset the peak to the current resident size (Linux's clear_refs "5") and return it; skips where
    the kernel does not allow it, since an old peak would hide any growth."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS through /proc/self/clear_refs: {exc}")
    return peak_rss_bytes()
