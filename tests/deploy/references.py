"""What rendered objects refer to, and whether each referent is among them: what a cluster would find missing.

Schema validation accepts a Deployment that mounts a claim nobody creates, a Service that selects no pod, or a
probe on a port the container does not open; a cluster leaves such pods Pending or never ready. Here every
reference is followed within the rendered objects, and one that leads outside them must be a documented
prerequisite (:data:`KUBERNETES_PREREQUISITES`, :data:`KSERVE_PREREQUISITES`, each named in
docs/kubernetes.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

Manifest = dict[str, Any]

KUBERNETES_PREREQUISITES: dict[tuple[str, str], str] = {
    ("CustomResourceDefinition", "servicemonitors.monitoring.coreos.com"):
        "the Prometheus Operator, for the servicemonitor overlay's ServiceMonitor",
}
"""What deploy/kubernetes may refer to without creating it: (kind, name) -> what provides it."""

KSERVE_PREREQUISITES: dict[tuple[str, str], str] = {
    ("CustomResourceDefinition", "servingruntimes.serving.kserve.io"): "KServe",
    ("CustomResourceDefinition", "inferenceservices.serving.kserve.io"): "KServe",
    ("Namespace", "convserve"): "deploy/kubernetes (any overlay) creates it",
    ("PersistentVolumeClaim", "convserve-models"):
        "the models overlay of deploy/kubernetes creates and fills it, in the same namespace",
}
"""What deploy/kserve may refer to without creating it."""

CUSTOM_RESOURCES = {
    ("monitoring.coreos.com", "ServiceMonitor"): "servicemonitors.monitoring.coreos.com",
    ("serving.kserve.io", "ServingRuntime"): "servingruntimes.serving.kserve.io",
    ("serving.kserve.io", "InferenceService"): "inferenceservices.serving.kserve.io",
}
"""The CustomResourceDefinition each custom kind needs."""

CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "StorageClass"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def reference_problems(objects: Iterable[Manifest], prerequisites: Iterable[tuple[str, str]]) -> list[str]:
    """Every reference among ``objects`` that leads to nothing in them and is not a listed prerequisite."""
    objects = list(objects)
    present = {(o["kind"], o["metadata"]["name"]) for o in objects} | set(prerequisites)
    problems = [*_namespace_problems(objects, present), *_custom_kind_problems(objects, present)]
    for workload in (o for o in objects if o["kind"] in WORKLOAD_KINDS):
        problems += [f"{_name(workload)}: {p}" for p in _pod_problems(workload["spec"]["template"]["spec"], present)]
    pods = [o["spec"]["template"] for o in objects if o["kind"] in WORKLOAD_KINDS]
    for service in (o for o in objects if o["kind"] == "Service"):
        problems += _service_problems(service, pods)
    for budget in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        if not any(_selects(budget["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"]) for pod in pods):
            problems.append(f"{_name(budget)}: its selector matches no pod template")
    for autoscaler in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        problems += _autoscaler_problems(autoscaler, objects)
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        problems += _service_monitor_problems(monitor, objects)
    for runtime in (o for o in objects if o["kind"] == "ServingRuntime"):
        problems += [f"{_name(runtime)}: {p}" for p in _pod_problems(runtime["spec"], present)]
    for service in (o for o in objects if o["kind"] == "InferenceService"):
        problems += _inference_service_problems(service, present)
    return problems


def _name(manifest: Manifest) -> str:
    return f"{manifest['kind']}/{manifest['metadata']['name']}"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def _namespace_problems(objects: list[Manifest], present: set[tuple[str, str]]) -> Iterator[str]:
    for manifest in objects:
        if manifest["kind"] in CLUSTER_SCOPED:
            continue
        namespace = manifest["metadata"].get("namespace")
        if not namespace:
            yield f"{_name(manifest)}: no namespace (it would land in whatever namespace kubectl's context names)"
        elif ("Namespace", namespace) not in present:
            yield f"{_name(manifest)}: namespace {namespace} is neither created nor a prerequisite"


def _custom_kind_problems(objects: list[Manifest], present: set[tuple[str, str]]) -> Iterator[str]:
    for manifest in objects:
        group = manifest["apiVersion"].rpartition("/")[0]
        if "." in group and not group.endswith(".k8s.io"):
            definition = CUSTOM_RESOURCES.get((group, manifest["kind"]))
            if definition is None or ("CustomResourceDefinition", definition) not in present:
                yield f"{_name(manifest)}: its CustomResourceDefinition is neither created nor a prerequisite"


def _pod_problems(pod: Manifest, present: set[tuple[str, str]]) -> Iterator[str]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for volume in volumes.values():
        yield from _volume_problems(volume, present)
    account = pod.get("serviceAccountName", "default")
    if account != "default" and ("ServiceAccount", account) not in present:
        yield f"service account {account} is neither created nor a prerequisite"
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    names = {c["name"]: c for c in containers}
    mounted = {mount["name"] for container in containers for mount in container.get("volumeMounts", [])}
    for unused in sorted(set(volumes) - mounted):
        yield f"volume {unused} is mounted by no container"
    for container in containers:
        where = f"container {container['name']}"
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                yield f"{where} mounts volume {mount['name']}, which the pod does not have"
        for source in container.get("envFrom", []):
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in source and (kind, source[key]["name"]) not in present and not source[key].get("optional"):
                    yield f"{where} takes its environment from {kind} {source[key]['name']}, which is missing"
        for variable in container.get("env", []):
            yield from _variable_problems(where, variable.get("valueFrom", {}), names, present)
        yield from _probe_problems(container)


def _volume_problems(volume: Manifest, present: set[tuple[str, str]]) -> Iterator[str]:
    sources = [key for key in volume if key != "name"]
    if len(sources) != 1:
        yield f"volume {volume['name']} has {len(sources)} sources ({', '.join(sources)}), not one"
    claim = volume.get("persistentVolumeClaim", {}).get("claimName")
    if claim is not None and ("PersistentVolumeClaim", claim) not in present:
        yield f"volume {volume['name']} needs PersistentVolumeClaim {claim}, which is neither created nor a prerequisite"
    for kind, key, name_key in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
        source = volume.get(key)
        if source is not None and (kind, source[name_key]) not in present and not source.get("optional"):
            yield f"volume {volume['name']} needs {kind} {source[name_key]}, which is neither created nor a prerequisite"


def _variable_problems(where: str, source: Manifest, containers: dict[str, Manifest],
                       present: set[tuple[str, str]]) -> Iterator[str]:
    for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
        if key in source and (kind, source[key]["name"]) not in present and not source[key].get("optional"):
            yield f"{where} reads a variable from {kind} {source[key]['name']}, which is missing"
    field = source.get("resourceFieldRef")
    if field is not None:
        target = containers.get(field.get("containerName", ""))
        kind, _, resource = field["resource"].partition(".")
        if target is None:
            yield f"{where} reads {field['resource']} of container {field.get('containerName')}, which is not in the pod"
        elif resource not in target.get("resources", {}).get(kind, {}):
            # Without it the kubelet gives the node's allocatable CPUs: a thread count for the wrong machine.
            yield f"{where} reads {field['resource']} of container {target['name']}, which sets none"


def _probe_problems(container: Manifest) -> Iterator[str]:
    ports = {p["containerPort"] for p in container.get("ports", [])} | \
        {p["name"] for p in container.get("ports", []) if "name" in p}
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(probe_name, {})
        for handler in ("grpc", "httpGet", "tcpSocket"):
            if handler in probe and probe[handler]["port"] not in ports:
                yield (f"container {container['name']}'s {probe_name} asks port {probe[handler]['port']}, which the "
                       f"container does not declare ({', '.join(map(str, sorted(ports, key=str)))})")


def _service_problems(service: Manifest, pods: list[Manifest]) -> Iterator[str]:
    selected = [pod for pod in pods if _selects(service["spec"].get("selector", {}), pod["metadata"]["labels"])]
    if not selected:
        yield f"{_name(service)}: its selector matches no pod template"
        return
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        for pod in selected:
            declared = [p for c in pod["spec"]["containers"] for p in c.get("ports", [])]
            if not any(target in (p["containerPort"], p.get("name")) for p in declared):
                yield f"{_name(service)}: port {port.get('name', port['port'])} targets {target}, which its pods do not open"


def _autoscaler_problems(autoscaler: Manifest, objects: list[Manifest]) -> Iterator[str]:
    reference = autoscaler["spec"]["scaleTargetRef"]
    target = [o for o in objects if o["kind"] == reference["kind"] and o["metadata"]["name"] == reference["name"]
              and o["apiVersion"] == reference.get("apiVersion", o["apiVersion"])]
    if not target:
        yield f"{_name(autoscaler)}: scales {reference['kind']}/{reference['name']}, which is not there"
        return
    containers = target[0]["spec"]["template"]["spec"]["containers"]
    for metric in autoscaler["spec"].get("metrics", []):
        resource = metric.get("resource", {})
        utilisation = resource.get("target", {}).get("type") == "Utilization"
        if utilisation and not all(resource["name"] in c.get("resources", {}).get("requests", {}) for c in containers):
            yield f"{_name(autoscaler)}: {resource['name']} utilisation needs a {resource['name']} request on every container"


def _service_monitor_problems(monitor: Manifest, objects: list[Manifest]) -> Iterator[str]:
    services = [o for o in objects if o["kind"] == "Service"
                and _selects(monitor["spec"]["selector"]["matchLabels"], o["metadata"].get("labels", {}))]
    for endpoint in monitor["spec"]["endpoints"]:
        if not any(p.get("name") == endpoint["port"] for s in services for p in s["spec"]["ports"]):
            yield f"{_name(monitor)}: no Service it selects has a port named {endpoint['port']}"


def _inference_service_problems(service: Manifest, present: set[tuple[str, str]]) -> Iterator[str]:
    model = service["spec"]["predictor"]["model"]
    runtime = model.get("runtime")
    if runtime is not None and ("ServingRuntime", runtime) not in present:
        yield f"{_name(service)}: runtime {runtime} is neither created nor a prerequisite"
    storage = model.get("storageUri", "")
    if storage.startswith("pvc://"):
        claim = storage.removeprefix("pvc://").split("/", 1)[0]
        if ("PersistentVolumeClaim", claim) not in present:
            yield f"{_name(service)}: storageUri needs PersistentVolumeClaim {claim}, which is neither created nor a prerequisite"
