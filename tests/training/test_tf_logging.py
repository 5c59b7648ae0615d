"""TensorFlow's import-time log lines: filtered by TF_CPP_MIN_LOG_LEVEL, absl's preamble dropped, each fact once."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from convserve_training.tf_logging import ABSL_PREAMBLE, CPP_LOG_LINE, filter_cpp_log_lines

ONEDNN = ("I0000 00:00:1796081945.760658    6761 port.cc:153] oneDNN custom operations are on. You may see slightly "
          "different numerical results.\n")
FEATURES = ("I0000 00:00:1796081953.161516    6766 cpu_feature_guard.cc:227] This TensorFlow binary is optimized.\n"
            "To enable the following instructions: AVX2 FMA, rebuild TensorFlow.\n")
NODEDEF = "E0000 00:00:1796081953.2    6766 meta_optimizer.cc:967] NodeDef mentions attribute use_unbounded_threadpool\n"
PYTHON_WARNING = "a Python warning of our own\n"
IMPORT_OUTPUT = (f"{PYTHON_WARNING}{ABSL_PREAMBLE}\n{ONEDNN}{ABSL_PREAMBLE}\n{ONEDNN.replace('6761', '6762')}"
                 f"{FEATURES}{NODEDEF}{NODEDEF}")


def test_everything_at_level_0_each_line_once_without_the_preamble():
    assert filter_cpp_log_lines(IMPORT_OUTPUT, 0) == f"{PYTHON_WARNING}{ONEDNN}{FEATURES}{NODEDEF}"


@pytest.mark.parametrize(("minimum", "kept"), [(1, NODEDEF), (2, NODEDEF), (3, "")])
def test_lines_below_the_level_go_with_their_continuation_lines(minimum, kept):
    assert filter_cpp_log_lines(IMPORT_OUTPUT, minimum) == f"{PYTHON_WARNING}{kept}"


def import_output(level: str | None) -> str:
    """What a fresh process that imports TensorFlow the way training does writes to stderr."""
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    done = subprocess.run(
        [sys.executable, "-c", "from convserve_training.tf_logging import import_tensorflow; import_tensorflow()"],
        capture_output=True, text=True, env=env, timeout=300, check=True)
    return done.stderr


def test_a_real_import_prints_no_cpp_line_by_default_and_each_once_at_level_0():
    assert not [line for line in import_output(None).splitlines() if CPP_LOG_LINE.match(line)]
    verbose = import_output("0")
    assert ABSL_PREAMBLE not in verbose
    cpp_lines = Counter(CPP_LOG_LINE.match(line)["text"] for line in verbose.splitlines() if CPP_LOG_LINE.match(line))
    assert cpp_lines, verbose  # at level 0 TensorFlow does say something (the oneDNN notice on x86)
    assert max(cpp_lines.values()) == 1, verbose
