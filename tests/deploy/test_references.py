"""Every overlay is complete on its own: what its objects refer to is rendered with them or a documented prerequisite.

Also the images: each one tagged, the CPU image in the cpu overlay, and the operator's documented step (an overlay
of their own with an ``images:`` entry) reaches every container.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import COMPONENTS, KSERVE, KUBERNETES, ROOT, find, render, render_components, render_overlay
from tests.deploy.references import KSERVE_PREREQUISITES, KUBERNETES_PREREQUISITES, reference_problems
from tests.deploy.test_manifests import ALL_OVERLAYS, needs_kustomize, server_container
from tests.test_compose import ComposeLoader

DOCS = ROOT / "docs" / "kubernetes.md"
IMAGES = ("convserve-server", "convserve-trainer")
REGISTRY = "registry.example.com/ml"


def containers_of(objects) -> list[dict]:
    """Every container and init container of every pod template among ``objects``."""
    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in {"Deployment", "Job"}]
    return [c for pod in pods for c in [*pod.get("initContainers", []), *pod["containers"]]]


@needs_kustomize
@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_every_reference_of_every_overlay_is_rendered_with_it_or_a_documented_prerequisite(overlay):
    assert reference_problems(render_overlay(overlay), KUBERNETES_PREREQUISITES) == []


@needs_kustomize
def test_all_components_composed_refer_only_to_what_they_render(tmp_path):
    assert reference_problems(render_components(COMPONENTS, tmp_path), KUBERNETES_PREREQUISITES) == []


@needs_kustomize
def test_kserve_refers_only_to_its_own_objects_and_documented_prerequisites():
    objects = render(KSERVE)
    assert {o["kind"] for o in objects} == {"ServingRuntime", "InferenceService"}
    assert reference_problems(objects, KSERVE_PREREQUISITES) == []
    assert reference_problems(objects, KUBERNETES_PREREQUISITES)  # without the claim and CRDs it would not come up


def test_every_prerequisite_is_named_in_the_kubernetes_doc():
    text = DOCS.read_text()
    for kind, name in [*KUBERNETES_PREREQUISITES, *KSERVE_PREREQUISITES]:
        assert name in text, f"docs/kubernetes.md does not name the prerequisite {kind} {name}"


@needs_kustomize
def test_the_check_finds_each_kind_of_dangling_reference():
    objects = [copy.deepcopy(o) for o in render_overlay("autoscale")]
    assert reference_problems(objects, KUBERNETES_PREREQUISITES) == []
    deployment = find(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    server = server_container(deployment)
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    models["persistentVolumeClaim"] = {"claimName": "convserve-models"}  # the claim of issue #28, item 1
    server["readinessProbe"]["grpc"]["port"] = 9999
    server["env"][-1]["valueFrom"]["resourceFieldRef"]["containerName"] = "sidecar"
    server["envFrom"] = [{"secretRef": {"name": "convserve-token"}}]
    pod["serviceAccountName"] = "convserve"
    find(objects, "Service", "convserve")["spec"]["selector"]["app.kubernetes.io/component"] = "serve"
    find(objects, "Service", "convserve-headless")["spec"]["ports"][0]["targetPort"] = "grcp"
    find(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] = "convserver"
    find(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] = {"app": "convserve"}
    del find(objects, "Service", "convserve")["metadata"]["namespace"]
    pod["volumes"].append({"name": "scratch", "emptyDir": {}})
    problems = "\n".join(reference_problems(objects, KUBERNETES_PREREQUISITES))
    for expected in ["volume models has 2 sources", "PersistentVolumeClaim convserve-models",
                     "asks port 9999", "container sidecar", "Secret convserve-token", "service account convserve",
                     "Service/convserve: its selector matches no pod", "targets grcp",
                     "scales Deployment/convserver", "PodDisruptionBudget/convserve: its selector",
                     "Service/convserve: no namespace", "volume scratch is mounted by no container"]:
        assert expected in problems, f"{expected!r} not reported:\n{problems}"
    del models["emptyDir"]
    assert "volume models has" not in "\n".join(reference_problems(objects, KUBERNETES_PREREQUISITES))
    monitor = find(render_overlay("servicemonitor"), "ServiceMonitor")
    assert reference_problems([monitor], []) and not reference_problems([monitor], [
        ("CustomResourceDefinition", "servicemonitors.monitoring.coreos.com")]) == []


@needs_kustomize
@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_every_image_is_one_of_ours_and_tagged(overlay):
    for container in containers_of(render_overlay(overlay)):
        name, _, tag = container["image"].partition(":")
        assert name in IMAGES and tag, container["image"]
    tags = {c["image"] for c in containers_of(render_overlay(overlay)) if c["image"].startswith("convserve-server")}
    assert tags == {"convserve-server:0.1.0-cpu" if overlay == "cpu" else "convserve-server:0.1.0"}


def test_the_cpu_tag_is_the_one_compose_builds():
    compose = yaml.load((ROOT / "docker-compose.cpu.yml").read_text(), Loader=ComposeLoader)
    (cpu,) = [e for e in yaml.safe_load((KUBERNETES / "components" / "cpu" / "kustomization.yaml").read_text())[
        "images"] if e["name"] == "convserve-server"]
    assert compose["services"]["server"]["image"] == f"convserve-server:{cpu['newTag']}"
    gpu = yaml.load((ROOT / "docker-compose.yml").read_text(), Loader=ComposeLoader)["services"]["server"]["image"]
    assert gpu != compose["services"]["server"]["image"]


@needs_kustomize
@pytest.mark.parametrize("overlay", ["cpu", "models"])
def test_an_operators_images_entry_reaches_every_container(overlay, tmp_path):
    # The step docs/kubernetes.md gives: an overlay of one's own that names the registry.
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(KUBERNETES / "overlays" / overlay, tmp_path)],
        "images": [{"name": name, "newName": f"{REGISTRY}/{name}"} for name in IMAGES],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    images = {c["image"] for c in containers_of(render(Path(tmp_path)))}
    assert images and all(image.startswith(f"{REGISTRY}/") for image in images), images
    assert any(image.endswith(":0.1.0-cpu") for image in images) == (overlay == "cpu")
