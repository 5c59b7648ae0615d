"""The cpu overlay's server container, as rendered, run as a real ``convserve-serve`` process: it serves.

Everything the container gets is applied as it is (arguments and environment) except what cannot apply on a
test machine, each replaced explicitly in :data:`REPLACED`: the model repository's path (the pod's volume),
the ports (free ones here) and the listening addresses (loopback here; the pod's 0.0.0.0 is covered by
tests/server/test_exposure.py). The downward API's value is resolved as the kubelet would resolve it.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from convserve_bench.processes import free_port, wait_until_ready
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_training.cli import build_parser, config_from_args
from tests.deploy.manifests import find, render_overlay
from tests.deploy.test_manifests import cpu_cores, flag_values, needs_kustomize, server_container
from tests.models import write_version

REPLACED = ("model-repository", "host", "port", "metrics-host", "metrics-port", "http-host", "http-port")
"""Flags whose pod values cannot apply here; every other flag is passed exactly as rendered."""


def resolved_environment(container: dict) -> dict[str, str]:
    """The container's variables as the kubelet sets them (literal values; resourceFieldRef limits, rounded up)."""
    environment = {}
    for variable in container.get("env", []):
        if "value" in variable:
            environment[variable["name"]] = variable["value"]
            continue
        field = variable["valueFrom"]["resourceFieldRef"]  # any other source would need a cluster: fail here
        kind, _, resource = field["resource"].partition(".")
        quantity = container["resources"][kind][resource]
        environment[variable["name"]] = str(math.ceil(cpu_cores(quantity) / cpu_cores(field.get("divisor", "1"))))
    return environment


def replaced_arguments(args: list[str], values: dict[str, str]) -> list[str]:
    """``args`` with the flags of :data:`REPLACED` given ``values``; each must be there to be replaced."""
    flags = flag_values(args)
    assert set(REPLACED) <= set(flags), f"the container no longer sets {set(REPLACED) - set(flags)}"
    return [f"--{name}={values[name]}" if name in REPLACED else f"--{name}={value}" for name, value in flags.items()]


@needs_kustomize
def test_the_cpu_overlays_server_arguments_and_environment_serve_on_a_real_process(tmp_path):
    container = server_container(find(render_overlay("cpu"), "Deployment"))
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1)
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    args = replaced_arguments(container["args"], {
        "model-repository": str(repository), "host": "127.0.0.1", "port": str(port),
        "metrics-host": "127.0.0.1", "metrics-port": str(metrics_port),
        "http-host": "127.0.0.1", "http-port": str(http_port)})
    environment = resolved_environment(container)
    assert environment["CONVSERVE_INTRA_OP_THREADS"] == "1"  # 2 CPUs shared by 2 instances
    # Only the container's variables and what Python needs to start: no CONVSERVE_* from this shell.
    environment |= {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([sys.executable, "-m", "convserve_server", *args], env=environment,
                                   stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_until_ready(f"127.0.0.1:{port}", process, 60, log)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for service in ("readiness", "liveness"):
                    answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
                image = pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[1, 8, 8, 3])
                reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest(
                    model_name="tiny", inputs=[image], raw_input_contents=[np.zeros((1, 8, 8, 3), "<f4").tobytes()]),
                    timeout=10)
            for path in ("/v2/health/ready", "/metrics"):  # the HTTP port and the metrics port answer too
                where = http_port if path.startswith("/v2") else metrics_port
                with urllib.request.urlopen(f"http://127.0.0.1:{where}{path}", timeout=10) as answer:
                    assert answer.status == 200, path
            probabilities = np.frombuffer(reply.raw_output_contents[0], "<f4")
            assert probabilities.shape == (4,) and abs(probabilities.sum() - 1) < 1e-5
        finally:
            process.kill()  # the drain (--drain-delay-s=5, then the grace) is tests/server/test_drain.py's subject
            process.wait(timeout=30)
        log.seek(0)
        text = log.read().decode()
    assert "CPUExecutionProvider (2 instances)" in text, text


@needs_kustomize
def test_the_base_install_model_arguments_parse_with_convserve_trains_own_parser():
    pod = find(render_overlay("base"), "Deployment")["spec"]["template"]["spec"]
    (install,) = pod["initContainers"]
    parsed = build_parser().parse_args(install["args"])
    config = config_from_args(parsed)
    mounts = {m["name"]: m["mountPath"] for m in install["volumeMounts"]}
    assert config.model_repository == Path(mounts["models"]) and parsed.skip_if_present
    served = next(m for m in server_container(find(render_overlay("base"), "Deployment"))["volumeMounts"]
                  if m["name"] == "models")
    assert served["mountPath"] == str(config.model_repository) and served["readOnly"] is True
