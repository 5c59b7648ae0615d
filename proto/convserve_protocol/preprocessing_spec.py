"""The preprocessing spec: how raw images become a model's input, as data stored in the model file.

:mod:`convserve_protocol.preprocessing` implements it, for training, the client SDK and the
server (which also reads it to know the input size and hands it to clients).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

# Still 1 with the ``center`` crop mode: the JSON keeps its shape and every value it could hold
# before means what it meant, and readers from before ``center`` refuse an unknown crop by name
# instead of misreading it.  A bump would only make those readers refuse default-mode models too.
_SPEC_VERSION = 1

CROP_MODES = ("center_to_aspect_ratio", "center")
"""The crop modes a spec may name: ``center_to_aspect_ratio`` (Keras ``Resizing(crop_to_aspect_ratio=True)``)
or ``center`` (Keras ``CenterCrop``); ``convserve_protocol.preprocessing`` implements both."""


@dataclass(frozen=True)
class PreprocessingSpec:
    """How raw images become model input; stored as JSON in the model file."""

    height: int
    """Model input height in pixels."""
    width: int
    """Model input width in pixels."""
    channels: int = 3
    """Colour channels the model takes (RGB)."""
    crop: str = "center_to_aspect_ratio"
    """How an image is fitted to the input size, one of :data:`CROP_MODES`: ``center_to_aspect_ratio``
    (Keras ``Resizing(crop_to_aspect_ratio=True)``) or ``center`` (Keras ``CenterCrop``)."""
    interpolation: str = "bilinear"
    """Resize method (half-pixel centres, no antialiasing)."""
    scale: float = 1.0 / 255.0
    """Multiplier applied after resizing."""
    offset: float = 0.0
    """Added after scaling."""

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"input size must be positive, got {self.height}x{self.width}")
        if self.channels != 3:
            raise ValueError(f"only 3-channel (RGB) models are supported, got {self.channels}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"unsupported crop {self.crop!r}; expected one of {', '.join(CROP_MODES)}")
        if self.interpolation != "bilinear":
            raise ValueError(f"unsupported interpolation {self.interpolation!r}")

    def to_json(self) -> str:
        """The spec as a JSON object, with a format version."""
        return json.dumps({"spec_version": _SPEC_VERSION, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessingSpec:
        """Parse :meth:`to_json`'s output; raises ``ValueError`` on anything else."""
        try:
            fields: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"preprocessing spec is not JSON: {exc}") from exc
        if not isinstance(fields, dict):
            raise ValueError("preprocessing spec must be a JSON object")
        version = fields.pop("spec_version", None)
        if version != _SPEC_VERSION:
            raise ValueError(f"unsupported preprocessing spec version {version!r}")
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ValueError(f"bad preprocessing spec: {exc}") from exc
