"""Several models: calls naming none get the default model (named, or the only one at startup), which a model added
later never changes; several models and no --default-model is a startup error."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest
from PIL import Image

from convserve_client import AsyncClient
from convserve_client.cli import main as classify_main
from convserve_protocol.protos import classifier_pb2 as cpb
from convserve_protocol.protos import classifier_pb2_grpc as cpb_grpc
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server.errors import StartupError
from tests.models import write_version

LABELS = {"alpha": ("a0", "a1", "a2"), "beta": ("b0", "b1")}


@pytest.fixture
def two_models(tmp_path):
    repository = tmp_path / "models"
    for name, labels in LABELS.items():
        write_version(repository, name, 1, labels=labels)
    return repository


async def info(port: int, name: str = "") -> cpb.ModelInfo:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await cpb_grpc.ClassifierStub(channel).GetModelInfo(cpb.GetModelInfoRequest(model_name=name), timeout=10)


async def metadata_default(port: int, name: str) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            pb.ModelMetadataRequest(name=name), timeout=10)
    return reply.parameters["default"].bool_param


async def test_without_a_flag_several_models_are_a_startup_error_naming_them(two_models, start_server):
    with pytest.raises(StartupError) as refused:
        await start_server(two_models)
    message = str(refused.value)
    assert "\n" not in message
    assert "2 models" in message and "(alpha, beta)" in message and "--default-model" in message


async def test_without_a_flag_the_only_model_is_the_default(tmp_path, start_server):
    repository = tmp_path / "models"
    write_version(repository, "beta", 1, labels=LABELS["beta"])
    server = await start_server(repository)
    unnamed = await info(server.port)
    assert unnamed.name == "beta" and unnamed.is_default
    assert await metadata_default(server.port, "beta")


async def test_the_named_default_survives_a_restart_with_a_model_added(two_models, start_server):
    first = await start_server(two_models, default_model="beta")
    assert (await info(first.port)).name == "beta"
    await first.shutdown(grace_s=5)
    write_version(two_models, "aardvark", 1)  # first in name order
    again = await start_server(two_models, default_model="beta")
    unnamed = await info(again.port)
    assert unnamed.name == "beta" and unnamed.is_default
    assert not (await info(again.port, "alpha")).is_default
    assert await metadata_default(again.port, "beta") and not await metadata_default(again.port, "aardvark")


async def test_the_flag_names_the_default(two_models, start_server):
    server = await start_server(two_models, default_model="beta")
    assert (await info(server.port)).name == "beta"
    assert await metadata_default(server.port, "beta")


async def test_an_unknown_default_is_a_startup_error(two_models, start_server):
    with pytest.raises(StartupError, match="--default-model gamma: no such model"):
        await start_server(two_models, default_model="gamma")


async def test_a_model_added_later_never_becomes_the_default(tmp_path, start_server):
    repository = tmp_path / "models"
    write_version(repository, "zeta", 1)
    server = await start_server(repository)
    write_version(repository, "alpha", 1)  # first in name order, but added while serving
    await server.core.refresh()
    assert server.core.model_names() == ["alpha", "zeta"]
    assert (await info(server.port)).name == "zeta"


async def test_the_sdk_and_the_cli_reach_the_default_model_unnamed(two_models, start_server, tmp_path, capsys):
    server = await start_server(two_models, default_model="beta")
    address = f"127.0.0.1:{server.port}"
    async with AsyncClient(address) as client:
        await client.wait_until_ready(timeout=10)
        results = await client.classify([np.zeros((8, 8, 3), np.uint8)], top_k=2)
    assert {prediction.label for prediction in results[0].top_k} == set(LABELS["beta"])
    path = tmp_path / "picture.png"
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path)
    code = await asyncio.to_thread(classify_main, [str(path), "--server", address, "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)[0]["label"] in LABELS["beta"]
