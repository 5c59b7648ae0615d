"""Nothing a caller sends is ever unpickled or evaluated: the serving and client code has no way to do it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [ROOT / "server" / "convserve_server", ROOT / "client" / "convserve_client"]
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def sources() -> list[Path]:
    return [path for package in PACKAGES for path in package.rglob("*.py") if "protos" not in path.parts]


def _is_builtin(function: ast.expr) -> bool:
    """``eval(...)`` or ``builtins.eval(...)``, not a method of the same name such as ``re.compile``."""
    if isinstance(function, ast.Name):
        return True
    return isinstance(function, ast.Attribute) and getattr(function.value, "id", "") == "builtins"


def problems_in(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name in FORBIDDEN_CALLS and _is_builtin(node.func):
                found.append(f"{name}()")
            if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                found.append("allow_pickle")
            if name == "load" and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "yaml":
                found.append("yaml.load()")
    return [f"{path.relative_to(root)}: {problem}" for problem in found]


def test_the_scan_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import pickle\nfrom marshal import loads\neval('1')\nimport numpy as np\nnp.load('x', allow_pickle=True)\n"
                      "import builtins\nbuiltins.exec('1')\nimport re\nre.compile('x')\n")
    assert len(problems_in(sample, root=tmp_path)) == 5  # re.compile is a regular expression, not code


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unpickling_or_evaluation(path: Path):
    assert problems_in(path) == []
