"""``python -m convserve_bench``: the same as ``convserve-bench``."""

from convserve_bench.cli import run

run()
