"""Bearer-token authentication: the scheme as RFC 7235 reads it, and an empty token refused at startup."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import numpy as np
import pytest

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc

TOKEN = "s3cret-Token"


def infer_request() -> pb.ModelInferRequest:
    image = np.zeros((1, 8, 8, 3), np.float32)
    return pb.ModelInferRequest(
        model_name="tiny",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[1, 8, 8, 3])],
        raw_input_contents=[image.tobytes()])


@pytest.mark.parametrize("header, admitted", [
    (f"Bearer {TOKEN}", True),
    (f"bearer {TOKEN}", True),
    (f"BEARER {TOKEN}", True),
    (f"Bearer  {TOKEN}", True),
    (f"Bearer {TOKEN.lower()}", False),  # the token itself is case-sensitive
    (f"Basic {TOKEN}", False),
    (TOKEN, False),
    ("Bearer", False),
])
async def test_the_scheme_is_case_insensitive_and_the_token_exact(tiny_repo, start_server, header, admitted):
    server = await start_server(tiny_repo, auth_token=TOKEN)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer_request(), metadata=[("authorization", header)], timeout=10)
        if admitted:
            assert len((await call).raw_output_contents) == 1
        else:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_token_is_a_one_line_startup_error(tiny_repo, value):
    env = {**os.environ, "CONVSERVE_AUTH_TOKEN": value}
    result = subprocess.run(
        [sys.executable, "-m", "convserve_server", "--model-repository", str(tiny_repo), "--port", "0",
         "--metrics-port", "-1", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "auth token is empty" in result.stderr, result.stderr
