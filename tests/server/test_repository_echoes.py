"""The repository RPCs' errors: at most 64 of the caller's characters, escaped, never the server's repository path;
and model folder names matched whole, so that ``"shapes\\n"`` is not served and its log line is escaped."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import grpc
import pytest

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_protocol.repository import is_model_name, scan_repository
from convserve_server.errors import MAX_QUOTED_CHARS
from tests.models import write_version

HOSTILE = "a\x00b\nc\rd\x1be" + "x" * 1000  # NUL, newline, carriage return, escape, then far past 64 characters
RAW_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


def assert_safe_echo(details: str, repository: Path) -> None:
    assert not RAW_CONTROLS.search(details), repr(details)  # escaped, not passed through
    assert r"a\x00b\nc\rd\x1be" in details, details  # repr-like: the caller can still see what was wrong
    assert "x" * (MAX_QUOTED_CHARS + 1) not in details and "(1009 characters)" in details, details
    assert str(repository) not in details and str(repository.resolve()) not in details, details


async def refusal(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_repository_errors_quote_64_escaped_characters_and_never_the_repository_path(tiny_repo, tiny_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tiny_server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for call in (stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=HOSTILE), timeout=10),
                     stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=HOSTILE), timeout=10)):
            error = await refusal(call)
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert_safe_echo(error.details(), tiny_repo)
        for call in (
            stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name=HOSTILE), timeout=10),
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny", repository_name=HOSTILE),
                                     timeout=10),
        ):
            error = await refusal(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert_safe_echo(error.details(), tiny_repo)
        request = pb.RepositoryModelLoadRequest(model_name="tiny")
        for index in range(6):
            request.parameters[f"{index}{HOSTILE}"].string_param = "x"
        error = await refusal(stub.RepositoryModelLoad(request, timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert not RAW_CONTROLS.search(error.details()) and "and 2 more" in error.details(), error.details()
        assert len(error.details()) < 600, error.details()


async def test_a_model_that_fails_to_load_is_reported_without_the_repository_path(tiny_repo, tiny_server):
    broken = tiny_repo / "tiny" / "2" / "model.onnx"
    broken.parent.mkdir()
    broken.write_bytes(b"\x08\x07not an ONNX model")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tiny_server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        error = await refusal(stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"), timeout=30))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = error.details()
    assert "refused tiny v2" in details and "tiny/2/model.onnx" in details and "not a loadable ONNX model" in details
    assert str(tiny_repo) not in details and str(tiny_repo.resolve()) not in details, details


@pytest.mark.parametrize("name", ["shapes\n", "shapes\n\n", "tiny\n"])
def test_a_model_name_must_match_the_rule_whole(name):
    assert is_model_name(name.rstrip("\n")) and not is_model_name(name)


async def test_a_folder_named_with_a_trailing_newline_is_not_served_and_its_log_line_is_escaped(
        tmp_path, start_server, caplog):
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1)
    write_version(repository, "shapes\n", 1)
    assert list(scan_repository(repository)) == ["tiny"]
    with caplog.at_level(logging.WARNING, logger="convserve_server.core"):
        server = await start_server(repository)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        assert [model.name for model in index.models] == ["tiny"]
        error = await refusal(stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="shapes\n"),
                                                       timeout=10))
        assert error.code() == grpc.StatusCode.NOT_FOUND and r"'shapes\n'" in error.details()
    lines = [record.getMessage() for record in caplog.records if "not a model name" in record.getMessage()]
    assert len(lines) == 1, lines  # once, though the index and the load read the repository again
    assert r"model folder 'shapes\n' is not a model name" in lines[0] and "\n" not in lines[0], lines
