"""docs/protocol.md's model-card table names every key a card can hold (it once left out convserve.golden)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.models import tiny_model, with_golden

PROTOCOL = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def documented_card_keys() -> set[str]:
    """The keys in the first column of the card table (a cell may name two: `a`, `b` or `a` / `b`)."""
    section = PROTOCOL.read_text().split("## The model card", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `convserve.")]
    return {key for row in rows for key in re.findall(r"`(convserve\.\w+)`", row.split("|")[1])}


def test_the_card_table_names_every_key_a_full_card_writes():
    model = with_golden(tiny_model())  # every field the card writes, golden vectors included
    written = {prop.key for prop in model.metadata_props if prop.key.startswith("convserve.")}
    assert "convserve.golden" in written
    assert written - documented_card_keys() == set(), "docs/protocol.md's card table lacks these keys"


def test_the_table_reader_finds_keys_given_two_to_a_cell():
    assert {"convserve.input_height", "convserve.input_width", "convserve.input_name",
            "convserve.output_name"} <= documented_card_keys()
