"""docs/configuration.md is the config class written out, and stays so."""

from __future__ import annotations

from pathlib import Path

from convserve_server.config import ServerConfig
from convserve_server.config_docs import configuration_markdown

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_committed_page_is_what_make_docs_generates() -> None:
    assert PAGE.read_text() == configuration_markdown(), "docs/configuration.md is stale: run `make docs`"


def test_every_setting_is_documented_with_flag_variable_and_description() -> None:
    page = configuration_markdown()
    for name, field in ServerConfig.model_fields.items():
        assert field.description, f"{name} has no description"
        assert f"| `--{name.replace('_', '-')}` | `CONVSERVE_{name.upper()}` |" in page
