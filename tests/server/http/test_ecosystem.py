"""The ecosystem's HTTP clients, unchanged: tritonclient.http (infer with binary and JSON outputs, metadata,
config, statistics, repository, is_model_ready), perf_analyzer -i http, and curl."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.images import encode
from tests.models import TINY_LABELS, write_version
from tests.server.http.serving import ServerThread, running_server
from tests.server.test_server import reference
from tests.server.test_triton import perf_analyzer  # noqa: F401  (the fixture)

# tritonclient runs in a process of its own, as a user's program would, and prints what it saw as JSON.
TRITONCLIENT_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException
client = triton.InferenceServerClient(sys.argv[1])
batch = np.random.default_rng(5).random((3, 8, 8, 3), dtype=np.float32)

def infer(binary_input, binary_output, class_count=0, **options):
    tensor = triton.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary_input)
    output = triton.InferRequestedOutput("probabilities", binary_data=binary_output, class_count=class_count)
    result = client.infer("tiny", [tensor], outputs=[output], **options).as_numpy("probabilities")
    return [[c.decode() for c in row] for row in result] if class_count else result.tolist()

def status_of(call):
    try:
        call()
    except InferenceServerException as exc:
        return f"{exc.status()}: {exc.message()}"
    return "OK"

seen = {"batch": batch.tolist()}
seen["live"], seen["ready"] = client.is_server_live(), client.is_server_ready()
seen["model_ready"], seen["absent_ready"] = client.is_model_ready("tiny"), client.is_model_ready("absent")
seen["server_metadata"] = client.get_server_metadata()
seen["model_metadata"] = client.get_model_metadata("tiny", "1")
seen["config"] = client.get_model_config("tiny")
for binary_input in (False, True):
    for binary_output in (False, True):
        seen[f"infer {binary_input} {binary_output}"] = infer(binary_input, binary_output)
seen["gzip"] = infer(True, True, request_compression_algorithm="gzip")
seen["deflate"] = infer(False, False, request_compression_algorithm="deflate")
seen["classes"] = infer(True, True, class_count=2)
seen["statistics"] = client.get_inference_statistics("tiny")
seen["index"] = client.get_model_repository_index()
seen["load_absent"] = status_of(lambda: client.load_model("absent"))
client.load_model("other")
seen["other_ready"] = client.is_model_ready("other")
client.unload_model("other")
seen["other_after_unload"] = client.is_model_ready("other")
seen["unknown_model"] = status_of(lambda: client.get_model_metadata("absent"))
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("http-ecosystem") / "models"
    write_version(repository, "tiny", 1)
    write_version(repository, "other", 1, seed=9)
    return repository


@pytest.fixture(scope="module")
def served(repository: Path) -> Iterator[ServerThread]:
    with running_server(repository, default_model="tiny", max_batch_size=8) as server:
        yield server


def run_tritonclient(port: int) -> Any:
    finished = subprocess.run([sys.executable, "-c", TRITONCLIENT_SCRIPT, f"127.0.0.1:{port}"], capture_output=True,
                              text=True, timeout=120, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout)


def test_tritonclient_http_works_unchanged(served, repository):
    seen = run_tritonclient(served.port)
    assert (seen["live"], seen["ready"], seen["model_ready"], seen["absent_ready"]) == (True, True, True, False)
    assert seen["server_metadata"]["name"] == "convserve"
    assert seen["model_metadata"]["inputs"][0]["shape"] == [-1, 8, 8, 3]
    config = seen["config"]
    assert (config["name"], config["max_batch_size"], config["input"][0]["dims"]) == ("tiny", 8, [8, 8, 3])
    expected = reference(repository / "tiny" / "1" / "model.onnx", np.array(seen["batch"], np.float32))
    for key in ("infer False False", "infer False True", "infer True False", "infer True True", "gzip", "deflate"):
        np.testing.assert_allclose(seen[key], expected, rtol=1e-5, err_msg=key)
    top = [row[0].split(":") for row in seen["classes"]]
    assert [(int(index), label) for _, index, label in top] == \
        [(int(i), TINY_LABELS[int(i)]) for i in np.argmax(expected, axis=1)]
    [statistics] = seen["statistics"]["model_stats"]
    assert statistics["inference_count"] >= 7 * 3 and statistics["inference_stats"]["success"]["count"] >= 7
    assert {(entry["name"], entry["state"]) for entry in seen["index"]} == {("tiny", "READY"), ("other", "READY")}
    assert seen["load_absent"].startswith("404") and "absent" in seen["load_absent"]
    assert (seen["other_ready"], seen["other_after_unload"]) == (True, False)
    assert seen["unknown_model"].startswith("404")


def test_perf_analyzer_over_http_measures_a_throughput(served, perf_analyzer):  # noqa: F811
    binary, env = perf_analyzer
    finished = subprocess.run(
        [binary, "-m", "tiny", "-i", "http", "-u", f"127.0.0.1:{served.port}", "--concurrency-range", "4",
         "-p", "1000", "--max-trials", "3", "-s", "1000"],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-3000:]
    throughput = float(re.search(r"Throughput: ([\d.]+) infer/sec", output).group(1))
    assert throughput > 0, output


@pytest.fixture(scope="module")
def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed")
    return path


def run_curl(curl: str, *args: str) -> tuple[int, Any]:
    """curl's answer: the HTTP status and the JSON body."""
    finished = subprocess.run([curl, "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                              timeout=30, check=True)
    body, _, status = finished.stdout.rpartition("\n")
    return int(status), json.loads(body)


def test_curl_health_infer_and_classify_a_file(served, curl, tmp_path):
    base = f"http://127.0.0.1:{served.port}"
    assert run_curl(curl, f"{base}/v2/health/ready") == (200, {"ready": True})
    request = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 8, 8, 3],
                                      "data": [0.5] * 192}]})
    status, answer = run_curl(curl, "-H", "Content-Type: application/json", "-d", request, f"{base}/v2/models/tiny/infer")
    assert status == 200 and len(answer["outputs"][0]["data"]) == 4
    picture = tmp_path / "picture.png"
    picture.write_bytes(encode(np.full((8, 8, 3), 200, np.uint8), "PNG"))
    status, answer = run_curl(curl, "-F", f"image=@{picture}", f"{base}/v2/models/tiny/classify")
    assert status == 200 and answer["results"][0]["filename"] == "picture.png"
    assert answer["results"][0]["label"] in TINY_LABELS
    status, answer = run_curl(curl, "-H", "Content-Type: image/png", "--data-binary", f"@{picture}",
                              f"{base}/v2/models/tiny/classify")
    assert status == 200 and answer["results"][0]["label"] in TINY_LABELS
