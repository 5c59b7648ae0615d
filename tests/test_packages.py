"""The distributions' boundaries: the server depends on the contract package, never on the client or training."""

from __future__ import annotations

import subprocess
import sys

import pytest

# What each entry point may not load: the server image ships neither the client SDK nor training, and loads Pillow
# only when it decodes a Classify request's encoded_images (convserve_protocol.preprocessing imports it lazily).
FORBIDDEN = {
    "convserve_server.app": ("PIL", "convserve_client", "convserve_training", "tensorflow", "keras"),
    "convserve_server.cli": ("PIL", "convserve_client", "convserve_training", "tensorflow", "keras"),
    "convserve_protocol.model_card": ("PIL", "convserve_client", "convserve_server", "onnxruntime"),
    "convserve_protocol.preprocessing": ("PIL", "convserve_client", "convserve_server", "onnxruntime"),
    "convserve_client": ("convserve_server", "convserve_training", "onnxruntime", "tensorflow"),
}


def loaded_top_level_modules(module: str) -> set[str]:
    """Top-level package names in ``sys.modules`` after importing ``module`` in a fresh interpreter."""
    code = f"import {module}, sys; print(' '.join(sorted({{name.split('.')[0] for name in sys.modules}})))"
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(output.split())


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_does_not_load_what_its_distribution_does_not_ship(module: str) -> None:
    loaded = loaded_top_level_modules(module)
    assert module.split(".")[0] in loaded  # the probe really imported something
    assert loaded.isdisjoint(FORBIDDEN[module]), sorted(loaded.intersection(FORBIDDEN[module]))


def test_importing_the_server_app_loads_no_pillow() -> None:
    """The issue's own one-liner, verbatim."""
    subprocess.run([sys.executable, "-c", "import convserve_server.app, sys; assert 'PIL' not in sys.modules"],
                   check=True)
