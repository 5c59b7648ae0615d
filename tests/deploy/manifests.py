"""Render and check deploy/'s manifests offline: kustomize, Kubernetes' JSON schemas, KServe's models.

Rendering runs ``kubectl kustomize`` (kubectl embeds kustomize; components need kustomize 3.7 or
later, kubectl 1.21 or later), else a standalone ``kustomize build``; with neither on PATH, the
tests that render skip and say so. No fallback from PyPI fits: its ``kustomize`` (0.6) generates
manifests in Python rather than rendering kustomizations, and ``pykustomize`` (Go bindings) needs
Python 3.14.

Schema validation uses kubernetes-validate's ``validate(..., strict=True)``, the function its
``kubernetes-validate --strict`` command runs for each object. The command only *warns* when it
has no schema for a kind; here that is an error for every built-in kind.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import referencing
import yaml
from kubernetes_validate import utils as kubernetes_validate

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
OVERLAYS = sorted(path.name for path in (KUBERNETES / "overlays").iterdir() if path.is_dir())
COMPONENTS = sorted(path.name for path in (KUBERNETES / "components").iterdir() if path.is_dir())
KSERVE_MODELS = json.loads((Path(__file__).with_name("kserve_models.json")).read_text())

# The oldest Kubernetes supported: native gRPC probes became GA in 1.27. The newest is the newest
# kubernetes-validate knows.
OLDEST_KUBERNETES = "1.27"
NEWEST_KUBERNETES = kubernetes_validate.major_minor(kubernetes_validate.latest_version())
KUBERNETES_VERSIONS = (OLDEST_KUBERNETES, NEWEST_KUBERNETES)

Manifest = dict[str, Any]


def kustomize_command() -> list[str] | None:
    """The command that renders a kustomization directory given as its last argument; None if none is installed."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@functools.lru_cache(maxsize=None)
def render(directory: Path) -> tuple[Manifest, ...]:
    """The objects ``directory``'s kustomization renders to (RuntimeError with kustomize's message if it fails)."""
    command = kustomize_command()
    if command is None:
        raise RuntimeError("neither kustomize nor kubectl is on PATH")
    done = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} {directory} failed: {done.stderr.strip()}")
    return tuple(document for document in yaml.safe_load_all(done.stdout) if document)


def render_overlay(name: str) -> tuple[Manifest, ...]:
    """The objects overlay ``name`` (or ``base``) renders to."""
    return render(KUBERNETES / "base" if name == "base" else KUBERNETES / "overlays" / name)


def render_components(names: list[str], scratch: Path) -> tuple[Manifest, ...]:
    """The base with the components ``names`` composed, through a kustomization written in ``scratch``."""
    relative = Path(os.path.relpath(KUBERNETES, scratch))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(relative / "base")],
        "components": [str(relative / "components" / name) for name in names],
    }
    (scratch / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(scratch)


def load_kserve() -> dict[str, Manifest]:
    """deploy/kserve's objects by kind."""
    objects = [document for path in sorted(KSERVE.glob("*.yaml")) if path.name != "kustomization.yaml"
               for document in yaml.safe_load_all(path.read_text()) if document]
    return {document["kind"]: document for document in objects}


def find(objects: tuple[Manifest, ...] | list[Manifest], kind: str, name: str | None = None) -> Manifest:
    """The one object of ``kind`` (and ``name``) among ``objects``."""
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def is_built_in(manifest: Manifest) -> bool:
    """Whether the object's API group is Kubernetes' own (core, unqualified groups, *.k8s.io), not a CRD's."""
    group = manifest["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def schema_problems(manifest: Manifest, version: str) -> list[str]:
    """What kubernetes-validate's strict schemas of Kubernetes ``version`` reject in a built-in object."""
    return list(_schema_problems(json.dumps(manifest, sort_keys=True), version))


@functools.lru_cache(maxsize=None)
def _schema_problems(manifest_json: str, version: str) -> tuple[str, ...]:
    # Cached by content: the overlays share most objects, and each validation parses the schemas again.
    manifest = json.loads(manifest_json)
    where = f"{manifest['kind']}/{manifest['metadata']['name']} on Kubernetes {version}"
    try:
        kubernetes_validate.validate(manifest, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return (f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}",)
    except kubernetes_validate.SchemaNotFoundError as exc:
        return (f"{where}: {exc.message}",)
    return ()


# --- Kubernetes types inside KServe objects: checked against the same strict schemas --------------

_NAMED_DEFINITIONS = {
    "ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
    "K8sIoApiAppsV1DeploymentStrategy": "io.k8s.api.apps.v1.DeploymentStrategy",
    "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior":
        "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior",
}


@functools.lru_cache(maxsize=None)
def _definitions(version: str) -> dict[str, Any]:
    full = next(v for v in reversed(kubernetes_validate.all_versions())
                if kubernetes_validate.major_minor(v) == version)
    path = f"kubernetes-json-schema/v{full}-local-strict/_definitions.json"
    return kubernetes_validate.schema_contents(path, version)


def kubernetes_definition(openapi_type: str, version: str) -> str | None:
    """The schema definition of a Kubernetes type the KServe models name (``V1Container``), or None."""
    if openapi_type in _NAMED_DEFINITIONS:
        return _NAMED_DEFINITIONS[openapi_type]
    match = re.fullmatch(r"V1([A-Z]\w*)", openapi_type)
    if not match:
        return None
    candidates = [name for name in _definitions(version)["$defs"]
                  if name.startswith("io.k8s.") and name.endswith(f".v1.{match.group(1)}")]
    return candidates[0] if len(candidates) == 1 else None


@functools.lru_cache(maxsize=None)
def _definition_validator(definition: str, version: str) -> jsonschema.protocols.Validator:
    definitions = _definitions(version)
    registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
    schema = {"$ref": f"{definitions['$id']}#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


# --- KServe objects against the kserve package's generated models ----------------------------------

_SCALARS = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str}


def kserve_problems(manifest: Manifest) -> list[str]:
    """Every field of a KServe object that kserve's models (and, inside them, Kubernetes' schemas) reject."""
    root = f"V1alpha1{manifest['kind']}" if manifest["apiVersion"].endswith("/v1alpha1") else \
        f"V1beta1{manifest['kind']}"
    if root not in KSERVE_MODELS["roots"]:
        return [f"{manifest['apiVersion']} {manifest['kind']}: no kserve model to check it against"]
    return list(_problems(manifest, root, manifest["kind"]))


def _problems(value: Any, openapi_type: str, path: str) -> Iterator[str]:
    if value is None or openapi_type == "object":
        return
    container = re.fullmatch(r"list\[(.+)\]|dict\(str, (.+)\)", openapi_type)
    if container and container.group(1):
        if not isinstance(value, list):
            yield f"{path}: expected a list ({openapi_type}), found {type(value).__name__}"
            return
        for index, item in enumerate(value):
            yield from _problems(item, container.group(1), f"{path}[{index}]")
    elif container:
        if not isinstance(value, dict):
            yield f"{path}: expected a map ({openapi_type}), found {type(value).__name__}"
            return
        for key, item in value.items():
            yield from _problems(item, container.group(2), f"{path}.{key}")
    elif openapi_type in _SCALARS:
        if not isinstance(value, _SCALARS[openapi_type]) or (openapi_type == "int" and isinstance(value, bool)):
            yield f"{path}: expected {openapi_type}, found {value!r}"
    elif openapi_type in KSERVE_MODELS["classes"]:
        yield from _object_problems(value, openapi_type, path)
    else:
        yield from _kubernetes_problems(value, openapi_type, path)


def _object_problems(value: Any, class_name: str, path: str) -> Iterator[str]:
    if not isinstance(value, dict):
        yield f"{path}: expected an object ({class_name}), found {value!r}"
        return
    fields = KSERVE_MODELS["classes"][class_name]
    for key, item in value.items():
        if key not in fields:
            yield f"{path}.{key}: no such field in kserve's {class_name} (fields: {', '.join(sorted(fields))})"
        else:
            yield from _problems(item, fields[key], f"{path}.{key}")


def _kubernetes_problems(value: Any, openapi_type: str, path: str) -> Iterator[str]:
    for version in KUBERNETES_VERSIONS:
        definition = kubernetes_definition(openapi_type, version)
        if definition is None:
            yield f"{path}: type {openapi_type} has no schema to check it against"
            return
        for error in _definition_validator(definition, version).iter_errors(value):
            where = ".".join([path, *map(str, error.path)])
            yield f"{where}: {error.message} ({definition}, Kubernetes {version})"
