"""``python -m convserve_server.config_docs``: docs/configuration.md, generated from :class:`ServerConfig`.

The page is the config class written out, so it cannot drift: a test compares
the committed file with this module's output.  Regenerate it with ``make docs``.
"""

from __future__ import annotations

import sys

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from convserve_server.config import ServerConfig

_HEADER = """# Server configuration

Generated from `ServerConfig` (`server/convserve_server/config.py`) by `make docs`; do not edit by hand.

Every setting is a flag of `convserve-serve` and an environment variable; a flag wins over its variable,
which wins over the default.

| flag | variable | default | meaning |
|---|---|---|---|
"""


def _default_text(field: FieldInfo) -> str:
    default = field.default
    if default is None:
        return "none"
    if isinstance(default, SecretStr):
        return "(secret)"
    return f"`{default}`"


def configuration_markdown() -> str:
    """The configuration page: one table row per :class:`ServerConfig` field, in declaration order."""
    rows = []
    for name, field in ServerConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        description = (field.description or "").replace("|", "\\|").replace("<", "&lt;")
        rows.append(f"| `{flag}` | `CONVSERVE_{name.upper()}` | {_default_text(field)} | {description} |")
    return _HEADER + "\n".join(rows) + "\n"


def main() -> None:
    """Write the page to stdout."""
    sys.stdout.write(configuration_markdown())


if __name__ == "__main__":
    main()
