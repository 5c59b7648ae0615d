"""Proving a model file on the execution provider it will be served with, before it is served.

A file may carry golden vectors (:mod:`convserve_protocol.golden`): inputs and
the probabilities a correct model gives for them.  After warm-up the server
runs those inputs through the very model object it will serve with and
compares.  A mismatch (another provider's arithmetic such as TF32, another
ONNX Runtime, a corrupted or edited file) refuses the version, unless the
operator allows unverified models; a file without golden vectors is served
and reported unverified.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from convserve_server.errors import StartupError
from convserve_server.runtime import OnnxModel

log = logging.getLogger(__name__)


class VerificationFailed(StartupError):
    """The model's outputs on its golden inputs differ from the recorded ones by more than the tolerance."""


@dataclass(frozen=True)
class Verification:
    """What checking a model's golden vectors on its provider found."""

    verified: bool
    """The golden vectors were run and matched within the tolerance."""
    provider: str = ""
    """Execution provider the golden inputs ran on; empty when the file has none."""
    worst_difference: float | None = None
    """Largest absolute probability difference measured; None when nothing was measured."""
    tolerance: float | None = None
    """The file's tolerance; None when it has no golden vectors."""
    golden_inputs: int = 0
    """Number of golden inputs run."""

    @property
    def measured(self) -> bool:
        """Whether the file had golden vectors and they were run."""
        return self.worst_difference is not None

    def summary(self) -> str:
        """A short phrase for log lines: verified or not, and by how much."""
        if not self.measured:
            return "unverified (no golden vectors)"
        state = "verified" if self.verified else "UNVERIFIED"
        relation = "<=" if self.verified else ">"
        return (f"{state}: worst difference {self.worst_difference:.3g} {relation} tolerance {self.tolerance:g} "
                f"on {self.golden_inputs} golden inputs")


def measure(model: OnnxModel) -> Verification:
    """Run the model's golden inputs through ``model.run`` and compare; never raises on a mismatch."""
    golden = model.card.golden
    if golden is None:
        return Verification(verified=False)
    worst = golden.worst_difference(model.run(golden.inputs))
    return Verification(verified=worst <= golden.tolerance, provider=model.provider, worst_difference=worst,
                        tolerance=golden.tolerance, golden_inputs=golden.count)


def verify(model: OnnxModel, name: str, version: int, allow_unverified: bool) -> Verification:
    """:func:`measure`, then refuse a mismatch with :class:`VerificationFailed` unless ``allow_unverified``.

    The error message is the one line that names the model, version, provider, worst difference and tolerance.
    """
    result = measure(model)
    if result.verified or not result.measured:
        return result
    problem = (f"model {name} v{version} fails verification on {result.provider}: worst difference "
               f"{_format(result.worst_difference)} > tolerance {result.tolerance:g} on {result.golden_inputs} "
               "golden inputs")
    if not allow_unverified:
        raise VerificationFailed(f"{problem}; not serving it (allow_unverified serves it anyway)")
    log.warning("%s; serving it anyway, reported unverified (allow_unverified)", problem)
    return result


def _format(difference: float | None) -> str:
    if difference is None or math.isinf(difference):
        return "inf (outputs of another shape, or not finite)"
    return f"{difference:.3g}"
