"""`make install` picks ONNX Runtime's GPU build exactly where nvidia-smi is on PATH (GPU=0|1 overrides).

``make -n -B`` prints what `make install` would run, without running it; the choice itself (at the top of the Makefile)
does run, with a PATH that holds a fake nvidia-smi or none.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="needs GNU make")


def planned_install(tmp_path: Path, nvidia_smi: bool, *variables: str) -> subprocess.CompletedProcess[str]:
    """What ``make install`` would run, on a PATH with only a fake nvidia-smi, or nothing, on it."""
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    if nvidia_smi:
        fake = tools / "nvidia-smi"
        fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (fake)'\n")
        fake.chmod(0o755)
    return subprocess.run([str(MAKE), "-n", "-B", "install", *variables], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PATH": str(tools), "HOME": str(tmp_path)})


def installs_gpu_build(plan: subprocess.CompletedProcess[str]) -> bool:
    assert plan.returncode == 0, plan.stderr
    commands = plan.stdout.splitlines()
    gpu = [line for line in commands if "pip install" in line and "[gpu]" in line]
    if gpu:  # the CPU build goes first: both builds install the same module
        removal = next(i for i, line in enumerate(commands) if "pip uninstall" in line and " onnxruntime" in line)
        assert removal < commands.index(gpu[0]), commands
    return bool(gpu)


def test_with_nvidia_smi_on_path_the_gpu_extra_is_installed_and_said_so(tmp_path):
    plan = planned_install(tmp_path, nvidia_smi=True)
    assert installs_gpu_build(plan)
    assert "ONNX Runtime: gpu (nvidia-smi found" in plan.stdout


def test_without_nvidia_smi_only_the_cpu_build_is_installed_and_said_so(tmp_path):
    plan = planned_install(tmp_path, nvidia_smi=False)
    assert not installs_gpu_build(plan)
    assert '[dev]"' in plan.stdout and "ONNX Runtime: cpu (no nvidia-smi" in plan.stdout
    # a GPU build left from an earlier install goes before the CPU build is installed
    commands = plan.stdout.splitlines()
    assert next(i for i, c in enumerate(commands) if "uninstall" in c and "onnxruntime-gpu" in c) < next(
        i for i, c in enumerate(commands) if '[dev]"' in c)


@pytest.mark.parametrize(("nvidia_smi", "gpu", "expected"), [(True, "0", False), (False, "1", True)])
def test_gpu_variable_overrides_what_nvidia_smi_says(tmp_path, nvidia_smi, gpu, expected):
    plan = planned_install(tmp_path, nvidia_smi, f"GPU={gpu}")
    assert installs_gpu_build(plan) is expected
    assert f"(GPU={gpu})" in plan.stdout


def test_serve_installs_with_the_same_choice_first(tmp_path):
    planned_install(tmp_path, nvidia_smi=True)  # puts the fake nvidia-smi on the PATH
    serve = subprocess.run([str(MAKE), "-n", "-B", "serve"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env={"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path)})
    assert installs_gpu_build(serve)
    assert "ONNX Runtime: gpu" in serve.stdout and "convserve-serve" in serve.stdout.splitlines()[-1]


def test_a_bad_gpu_value_is_a_one_line_error(tmp_path):
    plan = planned_install(tmp_path, True, "GPU=yes")
    assert plan.returncode != 0 and plan.stdout == "", plan.stdout
    assert len(plan.stderr.splitlines()) == 1 and "GPU must be 0, 1 or unset, not 'yes'" in plan.stderr, plan.stderr
