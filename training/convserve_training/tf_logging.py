"""TensorFlow's C++ log level, and TensorFlow's first import, which must come after it.

TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL`` once, when its C++ libraries load. At level 2 it still prints ERROR
lines that mean nothing to a user, such as ``E0000 ... NodeDef mentions attribute use_unbounded_threadpool``
on every ``fit``; level 3 keeps only FATAL ones. Keras' progress lines and Python's ``logging`` are not affected.

While it is being imported, TensorFlow logs through absl before absl's logging is set up, and those lines ignore
the level: the oneDNN notice comes at every level, twice (two of TensorFlow's libraries each carry a copy),
after absl's own "All log messages before absl::InitializeLog()" line, twice too. :func:`import_tensorflow`
holds back what the import writes to the standard error stream and passes it on filtered by the level, each
line once.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

TF_CPP_LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
"""The environment variable TensorFlow's C++ logging reads."""
QUIET_TF_CPP_LOG_LEVEL = "3"
"""FATAL only: no INFO, WARNING or ERROR lines from TensorFlow's C++ code."""
ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
"""absl's note that precedes its first line before initialisation; it says nothing about the run."""
CPP_LOG_LINE = re.compile(r"^(?P<severity>[IWEF])\d{4} [\d:.]+\s+\d+ (?P<text>\S+:\d+\] .*)$")
"""absl/glog's format: severity letter, MMDD, time, thread id, then ``file:line] message``."""
SEVERITIES = "IWEF"
"""absl's severities in the order TF_CPP_MIN_LOG_LEVEL counts them: 0 shows INFO and up, 3 only FATAL."""


def quiet_tensorflow_cpp_logs() -> None:
    """Silence TensorFlow's C++ log lines unless the user chose a level (``TF_CPP_MIN_LOG_LEVEL=0`` shows them)."""
    os.environ.setdefault(TF_CPP_LOG_LEVEL_VARIABLE, QUIET_TF_CPP_LOG_LEVEL)


def import_tensorflow() -> None:
    """Import TensorFlow and Keras, if not yet imported, with what the import prints filtered by the log level."""
    quiet_tensorflow_cpp_logs()
    if "tensorflow" in sys.modules:
        return
    with _standard_error_held_back():  # written out, filtered, when the block ends, even if the import fails
        importlib.import_module("tensorflow")
        importlib.import_module("keras")


def minimum_severity() -> int:
    """The level TF_CPP_MIN_LOG_LEVEL asks for, 0 (everything) if it is not a number."""
    try:
        return int(os.environ.get(TF_CPP_LOG_LEVEL_VARIABLE, "0"))
    except ValueError:
        return 0


def filter_cpp_log_lines(text: str, minimum: int) -> str:
    """``text`` without absl's preamble, without C++ log lines below ``minimum``, and each C++ line only once.

    A line that follows a C++ log line without being one itself continues that line's message and goes with it.
    Anything else (Python's own warnings, say) passes unchanged.
    """
    kept: list[str] = []
    seen: set[str] = set()
    keeping = True
    for line in text.splitlines(keepends=True):
        content = line.rstrip("\n")
        if content == ABSL_PREAMBLE:
            continue
        match = CPP_LOG_LINE.match(content)
        if match is not None:
            message = match["text"]
            keeping = SEVERITIES.index(match["severity"]) >= minimum and message not in seen
            seen.add(message)
        if keeping:
            kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def _standard_error_held_back() -> Iterator[None]:
    """Send file descriptor 2 to a temporary file for the block, then write it to stderr, filtered."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            sys.stderr.write(filter_cpp_log_lines(held.read().decode(errors="replace"), minimum_severity()))
            sys.stderr.flush()
