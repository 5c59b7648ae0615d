"""TensorFlow's C++ log level, which must be set before TensorFlow is first imported.

TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL`` once, when its C++ libraries load. At level 2 it still prints ERROR
lines that mean nothing to a user, such as ``E0000 ... NodeDef mentions attribute use_unbounded_threadpool``
on every ``fit``; level 3 keeps only FATAL ones. Keras' progress lines and Python's ``logging`` are not affected.
"""

from __future__ import annotations

import os

TF_CPP_LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
"""The environment variable TensorFlow's C++ logging reads."""
QUIET_TF_CPP_LOG_LEVEL = "3"
"""FATAL only: no INFO, WARNING or ERROR lines from TensorFlow's C++ code."""


def quiet_tensorflow_cpp_logs() -> None:
    """Silence TensorFlow's C++ log lines unless the user chose a level (``TF_CPP_MIN_LOG_LEVEL=0`` shows them)."""
    os.environ.setdefault(TF_CPP_LOG_LEVEL_VARIABLE, QUIET_TF_CPP_LOG_LEVEL)
