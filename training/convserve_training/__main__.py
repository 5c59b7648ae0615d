"""``python -m convserve_training``: the same as ``convserve-train``."""

from convserve_training.cli import run

run()
