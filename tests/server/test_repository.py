"""The server follows its model repository: half-written files, deleted versions, odd names and links, slow volumes."""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import grpc
import numpy as np
import pytest

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server import core
from tests.models import tiny_model, write_version


def infer_request(name: str = "tiny", version: str = "") -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=name, model_version=version)
    message.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8, 3])
    message.raw_input_contents.append(np.ones((1, 8, 8, 3), "<f4").tobytes())
    return message


async def answered_version(server, name: str = "tiny", version: str = "") -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(name, version), timeout=10)
    return reply.model_version


async def infer_code(server, name: str = "tiny", version: str = "") -> grpc.StatusCode:
    try:
        await answered_version(server, name, version)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_half_written_file_is_refused_then_loaded_once_complete(tiny_repo, start_server):
    server = await start_server(tiny_repo)
    complete = tiny_model(version="2", seed=2).SerializeToString()
    path = tiny_repo / "tiny" / "2" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(complete[: len(complete) // 2])  # caught by the poll halfway through a copy
    await server.core.refresh()
    assert server.core.versions("tiny") == [1] and await answered_version(server) == "1"
    await server.core.refresh()  # the same half file is not tried again
    temporary = path.with_name(".model.onnx.tmp")
    temporary.write_bytes(complete)
    os.replace(temporary, path)
    await server.core.refresh()
    assert server.core.versions("tiny") == [2] and await answered_version(server) == "2"


async def test_a_deleted_version_is_replaced_by_the_newest_left_then_retired(tmp_path, start_server):
    repository = tmp_path / "models"
    for version in (1, 2):
        write_version(repository, "tiny", version, seed=version)
    server = await start_server(repository)
    assert await answered_version(server) == "2"
    shutil.rmtree(repository / "tiny" / "2")
    await server.core.refresh()
    assert server.core.versions("tiny") == [1]
    assert await answered_version(server) == "1"
    assert await infer_code(server, version="2") == grpc.StatusCode.NOT_FOUND


async def test_a_model_with_every_version_deleted_is_no_longer_served(tmp_path, start_server):
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1)
    write_version(repository, "other", 1)
    server = await start_server(repository, default_model="tiny")
    shutil.rmtree(repository / "other")
    await server.core.refresh()
    assert server.core.model_names() == ["tiny"]
    assert await infer_code(server, "other") == grpc.StatusCode.NOT_FOUND
    assert await answered_version(server, "tiny") == "1"


async def test_a_missing_repository_retires_nothing(tiny_repo, start_server):
    server = await start_server(tiny_repo)
    tiny_repo.rename(tiny_repo.with_name("moved"))
    await server.core.refresh()
    assert server.core.versions("tiny") == [1] and await answered_version(server) == "1"


@pytest.mark.parametrize("odd", ["٣", "²", "9" * 40, "-1", "1.5"])
async def test_an_odd_version_folder_added_while_serving_blocks_no_reload(tiny_repo, start_server, odd):
    server = await start_server(tiny_repo)
    write_version(tiny_repo, "tiny", 5).parent.rename(tiny_repo / "tiny" / odd)
    write_version(tiny_repo, "tiny", 2, seed=2)
    await server.core.refresh()
    assert server.core.versions("tiny") == [2] and await answered_version(server) == "2"


async def test_links_are_followed_inside_the_repository_and_ignored_out_of_it(tmp_path, start_server, caplog):
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1)
    outside = tmp_path / "elsewhere"
    write_version(outside, "stray", 1)
    (repository / "stray").symlink_to(outside / "stray", target_is_directory=True)
    (repository / "alias").symlink_to(repository / "tiny", target_is_directory=True)
    write_version(outside, "tiny", 7)
    (repository / "tiny" / "7").symlink_to(outside / "tiny" / "7", target_is_directory=True)
    server = await start_server(repository, default_model="tiny")
    assert server.core.model_names() == ["alias", "tiny"]
    assert server.core.versions("tiny") == [1]
    assert await infer_code(server, "stray") == grpc.StatusCode.NOT_FOUND
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert "stray is a link out of the model repository" in warned and "7 is a link out" in warned


async def test_not_ready_until_the_newest_version_is_warm(tmp_path, start_server):
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1)
    write_version(repository, "tiny", 2, hidden_layers=4, hidden_width=2048)  # slow to warm up
    server = await start_server(repository, warm=False, versions_per_model=2)
    warming = asyncio.get_running_loop().create_task(server.warm_up())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not (await stub.ModelReady(pb.ModelReadyRequest(name="tiny", version="1"), timeout=10)).ready:
            assert not warming.done(), "version 1 never became ready"
            await asyncio.wait({warming}, timeout=0.005)
        assert not warming.done(), "version 2 warmed too fast to see the window; make it slower"
        assert not (await stub.ServerReady(pb.ServerReadyRequest(), timeout=10)).ready
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=10)).ready
        await warming
        assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=10)).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=10)).ready


SLOW_SCAN_S = 1.0


async def test_reading_a_slow_repository_leaves_the_event_loop_answering(tiny_repo, start_server, monkeypatch):
    server = await start_server(tiny_repo)
    real_scan = core.scan_repository

    def slow_scan(repository):  # a network volume, or thousands of model folders
        time.sleep(SLOW_SCAN_S)
        return real_scan(repository)

    monkeypatch.setattr(core, "scan_repository", slow_scan)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        scans = asyncio.ensure_future(asyncio.gather(server.core.refresh(),
                                                     stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30)))
        latencies = []
        while not scans.done():
            sent = time.monotonic()
            assert (await stub.ModelInfer(infer_request(), timeout=30)).model_version == "1"
            latencies.append(time.monotonic() - sent)
        _, index = await scans
    assert [(model.name, model.state) for model in index.models] == [("tiny", "READY")]
    # Had a scan run on the loop, a call would have waited for most of its second.
    assert len(latencies) >= 5 and max(latencies) < SLOW_SCAN_S / 2, latencies
