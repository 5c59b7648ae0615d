"""deploy/'s Kubernetes and KServe manifests, checked offline (tests/deploy/manifests.py says how).

No cluster runs here: what a kubelet, the autoscaler or KServe's controllers would do with these
objects is not tested, only that the objects are well-formed for the oldest and newest Kubernetes
supported, that KServe's own models accept every field, that the server accepts its arguments,
and that the probes and the drain settings agree with each other.
"""

from __future__ import annotations

import copy
import math
import os
import shlex
import subprocess
import sys
from typing import Any

import pytest
import yaml

from convserve_server.config import load_config
from tests.deploy.manifests import (
    COMPONENTS, KUBERNETES, KUBERNETES_VERSIONS, OVERLAYS, Manifest, find, is_built_in, kserve_problems,
    kustomize_command, load_kserve, render_components, render_overlay, schema_problems,
)

needs_kustomize = pytest.mark.skipif(kustomize_command() is None,
                                     reason="renders with kustomize or kubectl, and neither is on PATH")
ALL_OVERLAYS = ["base", *OVERLAYS]
SERVER = "server"
CRD_KINDS = {"ServiceMonitor"}  # validated structurally below; their schemas come with their operators


@pytest.fixture(autouse=True)
def only_the_manifests_configure_the_server(monkeypatch):
    """load_config also reads CONVSERVE_* variables: none from this shell may fill in for the manifests."""
    for name in [n for n in os.environ if n.startswith("CONVSERVE_")]:
        monkeypatch.delenv(name)


# --- helpers --------------------------------------------------------------------------------------

def server_container(deployment: Manifest) -> Manifest:
    """The convserve container of the Deployment."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == SERVER)


def flag_values(args: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as ``{name: value}`` (the manifests write every flag that way)."""
    assert all(a.startswith("--") and "=" in a for a in args), f"write each flag as --name=value: {args}"
    return dict(a[2:].split("=", 1) for a in args)


def prestop_sleep_s(container: Manifest) -> float:
    """Seconds the container's preStop hook sleeps (its exec command must be ``sleep N``)."""
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"preStop must be `sleep N`, found {shlex.join(command)}"
    return float(command[1])


def drain_contract_problem(termination_grace_s: float, container: Manifest, args: list[str]) -> str | None:
    """Why the kubelet could SIGKILL the server before its drain ends, or None if it cannot.

    The kubelet counts terminationGracePeriodSeconds from the start of preStop; after it, SIGTERM
    starts --drain-delay-s of answering while NOT_SERVING, then --grace-period-s for accepted calls.
    """
    flags = flag_values(args)
    needed = prestop_sleep_s(container) + float(flags["drain-delay-s"]) + float(flags["grace-period-s"])
    if termination_grace_s <= needed:
        return (f"terminationGracePeriodSeconds {termination_grace_s} <= preStop sleep + --drain-delay-s + "
                f"--grace-period-s = {needed}")
    return None


def every_container(pod_spec: Manifest) -> list[Manifest]:
    """The pod's containers and init containers."""
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def workloads(objects: tuple[Manifest, ...]) -> list[Manifest]:
    """The objects that run pods."""
    return [o for o in objects if o["kind"] in {"Deployment", "Job"}]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a matchLabels selector selects these labels."""
    return all(labels.get(key) == value for key, value in selector.items())


# --- Kubernetes: rendered and validated -----------------------------------------------------------

@needs_kustomize
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_every_object_of_every_overlay_passes_the_strict_schemas(overlay, version):
    objects = render_overlay(overlay)
    problems = [p for o in objects if is_built_in(o) for p in schema_problems(o, version)]
    assert not problems, "\n".join(problems)
    assert {o["kind"] for o in objects if not is_built_in(o)} <= CRD_KINDS


@needs_kustomize
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_all_components_compose_into_valid_objects(tmp_path, version):
    objects = render_components(COMPONENTS, tmp_path)
    problems = [p for o in objects if is_built_in(o) for p in schema_problems(o, version)]
    assert not problems, "\n".join(problems)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["Namespace", "Deployment", "Service", "Service", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Job", "ServiceMonitor"])


def test_each_overlay_is_the_base_plus_its_own_component():
    for overlay in OVERLAYS:
        kustomization = yaml.safe_load((KUBERNETES / "overlays" / overlay / "kustomization.yaml").read_text())
        assert kustomization["resources"] == ["../../base"]
        assert kustomization["components"] == [f"../../components/{overlay}"]


@needs_kustomize
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_schema_check_rejects_a_misspelt_field_and_an_unknown_built_in_kind(version):
    deployment = copy.deepcopy(find(render_overlay("base"), "Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 35
    assert any("terminationGracePeriodSecond" in p for p in schema_problems(deployment, version))
    made_up = {"apiVersion": "apps/v1", "kind": "Deploymint", "metadata": {"name": "x"}}
    assert is_built_in(made_up) and schema_problems(made_up, version)
    assert not is_built_in({"apiVersion": "monitoring.coreos.com/v1"})


@needs_kustomize
def test_the_kubernetes_validate_command_agrees_and_only_warns_about_unknown_kinds(tmp_path):
    rendered, unknown = tmp_path / "base.yaml", tmp_path / "unknown.yaml"
    rendered.write_text(yaml.safe_dump_all(render_overlay("base")))
    unknown.write_text(yaml.safe_dump({"apiVersion": "apps/v1", "kind": "Deploymint", "metadata": {"name": "x"}}))
    versions = [arg for version in KUBERNETES_VERSIONS for arg in ("-k", version)]
    command = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", *versions]
    done = subprocess.run([*command, str(rendered), str(unknown)], capture_output=True, text=True, timeout=60)
    # Exit status 0 and a warning per version for the unknown kind, nothing for the base's objects:
    # why schema_problems treats a missing schema as an error.
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert len(lines) == len(KUBERNETES_VERSIONS), done.stdout
    assert all(line.startswith(f"WARN {unknown}") and "Deploymint" in line for line in lines), done.stdout


# --- the server's arguments, probes and drain -----------------------------------------------------

@needs_kustomize
@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_server_arguments_parse_with_the_servers_own_config_loader(overlay):
    deployment = find(render_overlay(overlay), "Deployment")
    container = server_container(deployment)
    config = load_config(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.port == ports["grpc"] and config.metrics_port == ports["metrics"] and config.http_port == ports["http"]
    assert {config.host, config.metrics_host, config.http_host} == {"0.0.0.0"}  # written out, not left to defaults
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.metrics_port)
    models = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert str(config.model_repository) == models["mountPath"]
    assert config.device == {"cpu": "cpu", "gpu": "cuda"}.get(overlay, "auto")


def intra_op_threads_from_the_cpu_limit(container: Manifest) -> int:
    """CONVSERVE_INTRA_OP_THREADS as the kubelet resolves its resourceFieldRef: limits.cpu / divisor, rounded up."""
    variable = next(e for e in container["env"] if e["name"] == "CONVSERVE_INTRA_OP_THREADS")
    reference = variable["valueFrom"]["resourceFieldRef"]
    assert reference["resource"] == "limits.cpu" and reference["containerName"] == container["name"]
    return math.ceil(cpu_cores(container["resources"]["limits"]["cpu"]) / cpu_cores(reference["divisor"]))


def cpu_cores(quantity: str | int) -> float:
    """A CPU quantity ("2", "500m") in cores."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


@needs_kustomize
@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_onnx_runtime_threads_of_all_instances_add_up_to_the_cpu_limit(overlay):
    container = server_container(find(render_overlay(overlay), "Deployment"))
    instances = int(flag_values(container["args"])["model-instances"])
    threads = intra_op_threads_from_the_cpu_limit(container)
    assert "intra-op-threads" not in flag_values(container["args"])  # a flag would win over the variable
    assert threads * instances == cpu_cores(container["resources"]["limits"]["cpu"])


def test_the_kserve_runtime_derives_its_threads_from_the_cpu_limit_too(kserve):
    container = kserve["ServingRuntime"]["spec"]["containers"][0]
    instances = int(flag_values(container["args"])["model-instances"])
    limits = kserve["InferenceService"]["spec"]["predictor"]["model"]["resources"]["limits"]
    resolved = intra_op_threads_from_the_cpu_limit({**container, "resources": {"limits": limits}})
    assert resolved * instances == cpu_cores(limits["cpu"])


def test_the_thread_derivation_rounds_up_as_the_kubelet_does():
    container = {"name": "server", "resources": {"limits": {"cpu": "1500m"}}, "env": [{
        "name": "CONVSERVE_INTRA_OP_THREADS",
        "valueFrom": {"resourceFieldRef": {"containerName": "server", "resource": "limits.cpu", "divisor": "1"}}}]}
    assert intra_op_threads_from_the_cpu_limit(container) == 2


@needs_kustomize
@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_probes_are_native_grpc_on_the_health_service_names(overlay):
    container = server_container(find(render_overlay(overlay), "Deployment"))
    port = int(flag_values(container["args"])["port"])
    assert_probes_use_the_health_names(container, port)


def assert_probes_use_the_health_names(container: Manifest, port: int) -> None:
    """Startup and liveness ask for ``liveness``, readiness for ``readiness``, all over gRPC on ``port``."""
    expected = {"startupProbe": "liveness", "livenessProbe": "liveness", "readinessProbe": "readiness"}
    for probe, service in expected.items():
        assert container[probe]["grpc"] == {"port": port, "service": service}, probe


@needs_kustomize
@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_termination_grace_outlasts_prestop_drain_delay_and_grace_period(overlay):
    deployment = find(render_overlay(overlay), "Deployment")
    container = server_container(deployment)
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert drain_contract_problem(grace, container, container["args"]) is None


def test_the_drain_check_fails_when_the_grace_is_too_short():
    container = {"lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}}}
    args = ["--drain-delay-s=5", "--grace-period-s=20"]
    assert drain_contract_problem(31, container, args) is None
    assert "<= preStop sleep" in drain_contract_problem(30, container, args)


# --- Kubernetes: how the objects fit together ---------------------------------------------------

@needs_kustomize
@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_every_container_runs_as_non_root_on_a_read_only_root_without_capabilities(overlay):
    for workload in workloads(render_overlay(overlay)):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in every_container(pod):
            assert_locked_down(container["securityContext"])


def assert_locked_down(security: dict[str, Any]) -> None:
    """Non-root, no privilege escalation, read-only root filesystem, every capability dropped."""
    assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"]


@needs_kustomize
def test_services_and_the_disruption_budget_select_the_servers_pods():
    objects = render_overlay("base")
    deployment = find(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    container_ports = {p["name"] for p in server_container(deployment)["ports"]}
    services = [o for o in objects if o["kind"] == "Service"]
    assert sorted(s["spec"].get("clusterIP", "") for s in services) == ["", "None"]  # one headless, one ClusterIP
    for service in services:
        assert selects(service["spec"]["selector"], labels)
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["appProtocol"] == "kubernetes.io/h2c"
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    budget = find(objects, "PodDisruptionBudget")
    assert selects(budget["spec"]["selector"]["matchLabels"], labels)
    assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]


@needs_kustomize
def test_the_gpu_overlay_asks_for_an_nvidia_gpu_and_runs_on_cuda():
    deployment = find(render_overlay("gpu"), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert server_container(deployment)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert flag_values(server_container(deployment)["args"])["device"] == "cuda"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
    assert "nvidia.com/gpu" not in str(find(render_overlay("cpu"), "Deployment"))


@needs_kustomize
def test_the_autoscaler_owns_the_replica_count_and_scales_on_cpu():
    objects = render_overlay("autoscale")
    deployment, autoscaler = find(objects, "Deployment"), find(objects, "HorizontalPodAutoscaler")
    assert "replicas" not in deployment["spec"]
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert autoscaler["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "cpu" in server_container(deployment)["resources"]["requests"]  # utilisation is of the request
    budget = find(objects, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] < autoscaler["spec"]["minReplicas"]


@needs_kustomize
def test_the_base_installs_the_default_model_into_the_pods_own_volume():
    pod = find(render_overlay("base"), "Deployment")["spec"]["template"]["spec"]
    (install,) = pod["initContainers"]
    assert install["image"].startswith("convserve-trainer:")
    assert install["args"][install["args"].index("--model-repository") + 1] == "/models"
    assert "--skip-if-present" in install["args"]
    assert any(m["name"] == "models" and m["mountPath"] == "/models" and not m.get("readOnly")
               for m in install["volumeMounts"])
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    assert set(volume) == {"name", "emptyDir"}


@needs_kustomize
def test_the_training_job_fills_the_claim_the_servers_mount():
    objects = render_overlay("models")
    claim = find(objects, "PersistentVolumeClaim")["metadata"]["name"]
    for workload in (find(objects, "Deployment"), find(objects, "Job")):
        pod = workload["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "models")
        assert volume["persistentVolumeClaim"]["claimName"] == claim
    job = find(objects, "Job")["spec"]["template"]["spec"]
    train = job["containers"][0]
    repository = train["args"][train["args"].index("--model-repository") + 1]
    assert any(m["name"] == "models" and m["mountPath"] == repository and not m.get("readOnly")
               for m in train["volumeMounts"])
    (waiting,) = find(objects, "Deployment")["spec"]["template"]["spec"]["initContainers"]  # install-model gone
    assert waiting["name"] == "wait-for-model" and "/models/*/*/model.onnx" in waiting["command"][-1]
    volume = next(v for v in find(objects, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "models")
    assert set(volume) == {"name", "persistentVolumeClaim"}  # the base's emptyDir is gone


@needs_kustomize
def test_the_service_monitor_scrapes_the_metrics_port_of_one_service_and_the_annotations_are_off():
    objects = render_overlay("servicemonitor")
    monitor = find(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    port = monitor["spec"]["endpoints"][0]["port"]
    scraped = [s for s in objects if s["kind"] == "Service"
               and selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
               and any(p["name"] == port for p in s["spec"]["ports"])]
    assert len(scraped) == 1
    annotations = find(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false"
    assert find(render_overlay("base"), "Deployment")["spec"]["template"]["metadata"]["annotations"][
        "prometheus.io/scrape"] == "true"


# --- KServe -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kserve() -> dict[str, Manifest]:
    """deploy/kserve's objects by kind."""
    return load_kserve()


@pytest.mark.parametrize("kind", ["ServingRuntime", "InferenceService"])
def test_kserve_objects_match_kserves_models_field_by_field(kserve, kind):
    assert kserve_problems(kserve[kind]) == []


def test_the_kserve_check_catches_misspelt_misplaced_and_mistyped_fields(kserve):
    runtime = copy.deepcopy(kserve["ServingRuntime"])
    runtime["spec"]["supportedModelFormat"] = runtime["spec"].pop("supportedModelFormats")
    runtime["spec"]["containers"][0]["readinessProbe"]["grpc"]["serviceName"] = "readiness"
    service = copy.deepcopy(kserve["InferenceService"])
    service["spec"]["predictor"]["storageUri"] = service["spec"]["predictor"]["model"].pop("storageUri")
    service["spec"]["predictor"]["minReplicas"] = "2"
    runtime_problems, service_problems = kserve_problems(runtime), kserve_problems(service)
    assert any(p.startswith("ServingRuntime.spec.supportedModelFormat:") for p in runtime_problems)
    assert any("readinessProbe.grpc" in p and "serviceName" in p for p in runtime_problems)
    assert any(p.startswith("InferenceService.spec.predictor.storageUri:") for p in service_problems)
    assert any(p.startswith("InferenceService.spec.predictor.minReplicas: expected int") for p in service_problems)


def test_the_serving_runtime_speaks_grpc_v2_on_one_h2c_port_and_serves_mnt_models(kserve):
    spec = kserve["ServingRuntime"]["spec"]
    assert spec["protocolVersions"] == ["grpc-v2"]
    assert {"name": "onnx", "version": "1"}.items() <= spec["supportedModelFormats"][0].items()
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    flags = flag_values(container["args"])
    assert container["ports"] == [{"name": "h2c", "containerPort": int(flags["port"]), "protocol": "TCP"}]
    assert flags["model-repository"] == "/mnt/models"
    assert_probes_use_the_health_names(container, int(flags["port"]))
    assert_locked_down(container["securityContext"])


def test_kserve_arguments_parse_with_the_servers_own_config_loader(kserve):
    # KServe appends the InferenceService's model args to the runtime container's.
    args = kserve["ServingRuntime"]["spec"]["containers"][0]["args"] + \
        kserve["InferenceService"]["spec"]["predictor"]["model"].get("args", [])
    config = load_config(args)
    assert str(config.model_repository) == "/mnt/models" and config.device == "cuda"
    assert config.http_port == -1  # the runtime's one port is gRPC's


def test_the_inference_service_uses_the_runtime_raw_with_replicas_a_gpu_and_the_drain_grace(kserve):
    runtime, service = kserve["ServingRuntime"], kserve["InferenceService"]
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert predictor["securityContext"]["runAsNonRoot"] is True
    container = runtime["spec"]["containers"][0]
    args = container["args"] + model.get("args", [])
    assert drain_contract_problem(predictor["terminationGracePeriodSeconds"], container, args) is None
