"""Golden vectors that inflate to far more than their declared shapes (a compression bomb in a model file or a
model card) are refused after little work and little memory: by the server loading the file, by a hot reload
(the old version keeps serving), and by the SDK's card parser."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import zlib
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from convserve_protocol.golden import GOLDEN_KEY
from convserve_protocol.model_card import ModelCard
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.models import tiny_model, write_version

BOMB_MIB = 256
"""What the bomb's inputs inflate to; the tiny model's one declared golden image is 768 bytes."""
MAX_GROWTH_MIB = 48
"""Peak memory a refusal may add: far below the bomb, above what loading the file itself costs."""


def bomb_model(version: int) -> onnx.ModelProto:
    """The tiny model whose card declares one golden image of 8×8×3 floats, with inputs that inflate to
    ``BOMB_MIB`` MiB (level 1: about 1.1 MB compressed, made in a third of a second)."""
    compressor = zlib.compressobj(1)
    zeros = bytes(1 << 20)
    compressed = b"".join([*(compressor.compress(zeros) for _ in range(BOMB_MIB)), compressor.flush()])
    golden = {"format": 1, "tolerance": 1e-4, "inputs_shape": [1, 8, 8, 3], "probabilities_shape": [1, 4],
              "inputs": base64.b64encode(compressed).decode("ascii"),
              "probabilities": base64.b64encode(zlib.compress(np.full((1, 4), 0.25, "<f4").tobytes())).decode()}
    model = tiny_model(version=str(version))
    model.metadata_props.add(key=GOLDEN_KEY, value=json.dumps(golden))
    return model


@pytest.fixture(scope="module")
def bomb_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_version(tmp_path_factory.mktemp("bomb"), "tiny", 2, bomb_model(2))


_MEASURE = """
import json, resource, sys
from pathlib import Path
import onnxruntime  # imported before the baseline: its import is not the refusal's cost
from convserve_protocol.model_card import ModelCard
from convserve_server.runtime import DeviceRequest, OnnxModel
path, how = Path(sys.argv[1]), sys.argv[2]
if how == "card":  # the SDK's parser: ModelInfo.model_card_json as a server would send it
    import onnx
    text = json.dumps({p.key: p.value for p in onnx.load(str(path)).metadata_props})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    if how == "card":
        ModelCard.from_json(text)
    else:
        OnnxModel.load(path, DeviceRequest.parse("cpu"), 1, 0, 1)
    error = ""
except ValueError as exc:
    error = str(exc)
except Exception as exc:
    error = f"{type(exc).__name__}: {exc}"
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"error": error, "grown_mib": grown / 1024}))
"""


@pytest.mark.parametrize("how", ["card", "server"])
def test_a_golden_vector_bomb_is_refused_with_a_clear_reason_and_little_memory(bomb_file, how):
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(bomb_file), how], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert "inflates to more than the 768 bytes shape [1, 8, 8, 3]" in outcome["error"], outcome
    assert GOLDEN_KEY in outcome["error"], outcome
    assert outcome["grown_mib"] < MAX_GROWTH_MIB, outcome  # inflating it whole took BOMB_MIB and more


@pytest.mark.parametrize("inputs_shape, probabilities_shape, reason", [
    ([1, 16, 16, 3], [1, 4], r"declared shapes \[1, 16, 16, 3\] and \[1, 4\] do not fit the model's \(N, 8, 8, 3\)"),
    ([100_000, 8, 8, 3], [100_000, 4], "declares 76800000 bytes of float32, more than the 67108864 bytes"),
])
def test_declared_golden_shapes_are_checked_before_anything_is_inflated(inputs_shape, probabilities_shape, reason):
    values = {prop.key: prop.value for prop in tiny_model().metadata_props}
    declared = {"format": 1, "tolerance": 1e-4, "inputs_shape": inputs_shape,
                "probabilities_shape": probabilities_shape, "inputs": "not read", "probabilities": "not read"}
    with pytest.raises(ValueError, match=reason):
        ModelCard.from_metadata({**values, GOLDEN_KEY: json.dumps(declared)})


async def test_a_hot_reload_to_a_bomb_is_refused_and_the_old_version_keeps_serving(tiny_repo, start_server):
    server = await start_server(tiny_repo)
    bomb = write_version(tiny_repo, "tiny", 2, bomb_model(2))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "refused tiny v2" in refused.value.details() and "compression bomb" in refused.value.details()
        bomb.touch()  # a changed file is tried again by the poller, and refused again
        await server.core.refresh()
        assert server.core.versions("tiny") == [1]
        request = pb.ModelInferRequest(model_name="tiny")
        request.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8, 3])
        request.raw_input_contents.append(np.zeros((1, 8, 8, 3), "<f4").tobytes())
        response = await stub.ModelInfer(request, timeout=10)
        assert response.model_version == "1" and len(response.outputs) == 1
