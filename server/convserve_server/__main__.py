"""``python -m convserve_server``: the same as ``convserve-serve``."""

from convserve_server.cli import run

run()
