"""Write kserve_models.json: the fields of KServe's ServingRuntime and InferenceService models.

The ``kserve`` package cannot be installed next to convserve (kserve 0.21 requires protobuf<7;
convserve's generated code requires protobuf>=7.35), and importing its models runs its heavy
``__init__`` (FastAPI, uvicorn, pandas...). Its model classes are generated OpenAPI code whose
``openapi_types`` and ``attribute_map`` are literal dicts, so this script reads them from the
wheel's source with ``ast``, without importing anything, keeping the classes reachable from the
two roots. Run it again for a new KServe version:

    pip download --no-deps kserve==0.21.0 -d /tmp/kserve && \
    python tests/deploy/extract_kserve_models.py /tmp/kserve/kserve-0.21.0-py3-none-any.whl
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path

ROOTS = ("V1alpha1ServingRuntime", "V1beta1InferenceService")
OUTPUT = Path(__file__).with_name("kserve_models.json")


def class_tables(source: str) -> dict[str, dict[str, str]]:
    """``{class name: {json key: openapi type}}`` for each generated model class in ``source``."""
    tables = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        literals = {
            statement.targets[0].id: ast.literal_eval(statement.value)
            for statement in node.body
            if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name)
            and statement.targets[0].id in ("openapi_types", "attribute_map")
        }
        if {"openapi_types", "attribute_map"} <= literals.keys():
            types, keys = literals["openapi_types"], literals["attribute_map"]
            tables[node.name] = {keys[attribute]: types[attribute] for attribute in types}
    return tables


def referenced_names(openapi_type: str) -> list[str]:
    """The class names inside ``list[...]`` and ``dict(str, ...)`` types."""
    inner = re.fullmatch(r"list\[(.+)\]|dict\(str, (.+)\)", openapi_type)
    if inner:
        return referenced_names(inner.group(1) or inner.group(2))
    return [openapi_type]


def reachable(tables: dict[str, dict[str, str]], roots: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """The tables of the roots and of every KServe class their fields lead to."""
    kept: dict[str, dict[str, str]] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in kept or name not in tables:
            continue
        kept[name] = tables[name]
        pending.extend(n for t in tables[name].values() for n in referenced_names(t))
    return dict(sorted(kept.items()))


def main(wheel: str) -> None:
    """Read the models of the kserve wheel at ``wheel`` and write :data:`OUTPUT`."""
    tables: dict[str, dict[str, str]] = {}
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        version = next(line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Version:"))
        for name in archive.namelist():
            if name.startswith("kserve/models/") and name.endswith(".py"):
                tables.update(class_tables(archive.read(name).decode()))
    document = {"kserve": version, "roots": list(ROOTS), "classes": reachable(tables, ROOTS)}
    OUTPUT.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
