"""The training module's one exception type: a clear, one-line reason to stop."""

from __future__ import annotations


class TrainingError(Exception):
    """Training or export cannot go on; the message is shown to the user as is."""
