"""How the runtime sets up a CUDA session, observed on any machine: the library preload, the options, the first run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import onnxruntime as ort
from onnx import TensorProto, helper

from convserve_server.runtime import CPU, CUDA, first_run_error

from tests.models import conv_model, tiny_model, write_version

# Runs the real runtime in a fresh process with onnxruntime's preload_dlls and InferenceSession wrapped so that each
# call is recorded in order (then made for real).  On the CPU build, CUDA is listed as onnxruntime-gpu lists it where
# its libraries are missing, so that the runtime takes its CUDA path and falls back to the CPU as it would there.
RECORDER = textwrap.dedent('''
    import json, logging, sys
    from pathlib import Path
    import onnxruntime as ort

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    calls = []
    real_preload, RealSession, real_available = ort.preload_dlls, ort.InferenceSession, ort.get_available_providers

    def preload_dlls(*args, **kwargs):
        calls.append({"call": "preload_dlls"})
        return real_preload(*args, **kwargs)

    class InferenceSession(RealSession):
        def __init__(self, path, sess_options=None, providers=None, **kwargs):
            providers = providers or []
            calls.append({
                "call": "session",
                "providers": [p[0] if isinstance(p, tuple) else p for p in providers],
                "cuda_options": next((p[1] for p in providers if isinstance(p, tuple) and p[0] == "{cuda}"), None),
                "intra_op_threads": sess_options.intra_op_num_threads if sess_options else None,
            })
            super().__init__(path, sess_options, providers, **kwargs)

    ort.preload_dlls, ort.InferenceSession = preload_dlls, InferenceSession
    if "{cuda}" not in real_available():
        ort.get_available_providers = lambda: [*real_available(), "{cuda}"]

    from convserve_server.runtime import DeviceRequest, OnnxModel

    providers = [OnnxModel.load(Path(path), DeviceRequest("auto")).provider for path in sys.argv[2:]]
    Path(sys.argv[1]).write_text(json.dumps({"calls": calls, "providers": providers}))
''').replace("{cuda}", CUDA)


def load_recorded(tmp_path: Path, *paths: Path) -> tuple[list[dict], list[str], subprocess.CompletedProcess[str]]:
    """Load the models with ``device auto`` in a recorded process: its onnxruntime calls, the providers, the process."""
    (tmp_path / "recorder.py").write_text(RECORDER)
    record = tmp_path / "calls.json"
    done = subprocess.run([sys.executable, str(tmp_path / "recorder.py"), str(record), *map(str, paths)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(record.read_text())
    return result["calls"], result["providers"], done


def test_preload_dlls_runs_once_and_quietly_before_the_first_cuda_session(tmp_path):
    calls, _, done = load_recorded(tmp_path, write_version(tmp_path / "models", "conv", 1, conv_model()),
                                   write_version(tmp_path / "models", "tiny", 1, tiny_model()))
    cuda_sessions = [i for i, call in enumerate(calls) if call["call"] == "session" and CUDA in call["providers"]]
    assert [call["call"] for call in calls].count("preload_dlls") == 1, calls
    assert calls[0]["call"] == "preload_dlls" and len(cuda_sessions) == 2, calls
    # What preload_dlls prints about libraries it cannot find goes to the debug log, not to the terminal.
    assert "Failed to load" not in done.stdout + done.stderr


def test_cuda_sessions_get_tf32_off_heuristic_conv_search_and_one_intra_op_thread(tmp_path):
    calls, _, _ = load_recorded(tmp_path, write_version(tmp_path / "models", "conv", 1, conv_model()))
    calls = [call for call in calls if call["call"] == "session"]
    cuda = [call for call in calls if CUDA in call["providers"]]
    assert len(cuda) == 1, calls
    assert cuda[0]["providers"] == [CUDA, CPU]
    assert cuda[0]["cuda_options"]["use_tf32"] == "0"
    assert cuda[0]["cuda_options"]["cudnn_conv_algo_search"] == "HEURISTIC"
    assert cuda[0]["intra_op_threads"] == 1
    if len(calls) > 1:  # no usable GPU: the CPU session that replaces the CUDA one gets the CPU's threads back
        assert calls[1]["providers"] == [CPU] and calls[1]["intra_op_threads"] == 0, calls  # 0: ORT's default


def test_auto_runs_on_cuda_or_else_warns_once_per_model_why_and_reports_the_cpu(tmp_path):
    _, providers, done = load_recorded(tmp_path, write_version(tmp_path / "models", "conv", 1, conv_model()),
                                       write_version(tmp_path / "models", "tiny", 1, tiny_model()))
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING convserve_server.runtime:")]
    if providers == [CUDA, CUDA]:  # a usable GPU
        assert warnings == [], warnings
    else:  # no GPU here: the provider reported is the one really used, and one line says why
        assert providers == [CPU, CPU] and len(warnings) == 2, (providers, done.stderr)
        assert all("running on the CPU" in line and ("cannot open shared object file" in line or "no usable GPU" in line)
                   for line in warnings), warnings


def test_first_run_error_is_none_for_a_model_that_runs_and_one_line_for_one_that_fails(tmp_path):
    good = write_version(tmp_path, "conv", 1, conv_model())
    assert first_run_error(ort.InferenceSession(str(good), providers=[CPU])) is None
    graph = helper.make_graph(  # loads, but 8*8*3 values cannot be reshaped into rows of 7
        [helper.make_node("Reshape", ["image", "shape"], ["rows"])], "bad",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 8, 8, 3])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 7])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(model.SerializeToString())
    error = first_run_error(ort.InferenceSession(str(bad), providers=[CPU]))
    assert error is not None and "\n" not in error and "Reshape" in error, error
