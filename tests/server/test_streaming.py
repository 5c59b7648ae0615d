"""Triton's ModelStreamInfer: every request on the stream gets one answer, failures included, and streams are bounded."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
import numpy as np
import pytest

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server.servicers.streaming import IN_FLIGHT_PER_STREAM
from tests.server.test_server import images, infer_request, metric, reference

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


def address(server) -> str:
    return f"127.0.0.1:{server.port}"


def by_id(answers: list[pb.ModelStreamInferResponse]) -> dict[str, pb.ModelStreamInferResponse]:
    """The answers keyed by request id; fails if an id was answered twice."""
    keyed = {answer.infer_response.id: answer for answer in answers}
    assert len(keyed) == len(answers), [answer.infer_response.id for answer in answers]
    return keyed


def output_of(answer: pb.ModelStreamInferResponse) -> np.ndarray:
    response = answer.infer_response
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(tuple(response.outputs[0].shape))


async def test_every_request_is_answered_once_by_id_and_a_bad_one_does_not_end_the_stream(tiny_repo, start_server):
    server = await start_server(tiny_repo)
    batches = {str(i): images(1 + i % 3, seed=i) for i in range(40)}
    requests = [infer_request(batch, id=key) for key, batch in batches.items()]
    wrong_shape = infer_request(np.zeros((1, 5, 5, 3), np.float32), id="wrong-shape")
    unknown_model = infer_request(images(1), id="unknown-model", model_name="absent")
    requests[10:10] = [wrong_shape]
    requests[25:25] = [unknown_model]
    async with grpc.aio.insecure_channel(address(server)) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests))
        answers = by_id([answer async for answer in call])
        assert await call.code() == grpc.StatusCode.OK
    assert set(answers) == {*batches, "wrong-shape", "unknown-model"}
    model_path = tiny_repo / "tiny" / "1" / "model.onnx"
    for key, batch in batches.items():
        assert answers[key].error_message == ""
        assert answers[key].infer_response.model_name == "tiny" and answers[key].infer_response.model_version == "1"
        np.testing.assert_allclose(output_of(answers[key]), reference(model_path, batch), rtol=1e-5, atol=1e-6)
    assert answers["wrong-shape"].error_message.startswith("INVALID_ARGUMENT: images must have shape")
    assert answers["unknown-model"].error_message.startswith("NOT_FOUND: ")
    assert answers["unknown-model"].infer_response.model_name == "absent"
    assert metric(server, 'convserve_requests_total{code="OK",method="ModelStreamInfer",model="tiny"}') == 40


async def test_bytes_that_are_not_a_request_get_an_invalid_argument_answer(tiny_repo, start_server):
    server = await start_server(tiny_repo)
    good = infer_request(images(1), id="good").SerializeToString()
    async with grpc.aio.insecure_channel(address(server)) as channel:
        stream = channel.stream_stream(STREAM_METHOD, request_serializer=None,
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        call = stream(iter([b"\xff\xff\xff", good]))
        answers = [answer async for answer in call]
        assert await call.code() == grpc.StatusCode.OK
    [malformed] = [answer for answer in answers if answer.error_message]
    assert malformed.error_message.startswith("INVALID_ARGUMENT: request is not a valid inference.ModelInferRequest")
    assert [answer.infer_response.id for answer in answers if not answer.error_message] == ["good"]


async def test_a_stream_has_a_bounded_number_of_requests_in_flight_and_all_are_answered(tiny_repo, start_server):
    # Batches wait up to 2 s to fill 64 rows: the queue then shows how many requests the server has read.
    server = await start_server(tiny_repo, max_batch_size=64, max_queue_delay_us=2_000_000)
    sent = 3 * IN_FLIGHT_PER_STREAM
    async with grpc.aio.insecure_channel(address(server)) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([infer_request(images(1, seed=i), id=str(i)) for i in range(sent)]))
        answers: list[pb.ModelStreamInferResponse] = []

        async def read_all() -> None:
            answers.extend([answer async for answer in call])

        reader = asyncio.ensure_future(read_all())
        depths = []
        deadline = time.monotonic() + 15
        while not depths or depths[-1] < IN_FLIGHT_PER_STREAM:
            assert time.monotonic() < deadline, f"queue depths seen: {depths}"
            depths.append(await asyncio.to_thread(metric, server, 'convserve_queue_depth{model="tiny"}'))
        await asyncio.wait_for(reader, 30)
        assert await call.code() == grpc.StatusCode.OK
    assert max(depths) == IN_FLIGHT_PER_STREAM
    assert set(by_id(answers)) == {str(i) for i in range(sent)}
    assert not [answer.error_message for answer in answers if answer.error_message]


async def test_a_full_queue_refuses_requests_on_the_stream_and_answers_the_rest(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_queue_size=2, max_queue_delay_us=200_000)
    async with grpc.aio.insecure_channel(address(server)) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([infer_request(images(1, seed=i), id=str(i)) for i in range(12)]))
        answers = by_id([answer async for answer in call])
        assert await call.code() == grpc.StatusCode.OK
    assert set(answers) == {str(i) for i in range(12)}
    refused = {key for key, answer in answers.items() if answer.error_message}
    assert refused and len(refused) < 12
    assert {answers[key].error_message.split(":")[0] for key in refused} == {"RESOURCE_EXHAUSTED"}


async def test_open_streams_are_bounded_per_peer_and_a_closed_one_frees_its_place(tiny_repo, start_server):
    server = await start_server(tiny_repo, max_inference_streams_per_peer=1)
    async with grpc.aio.insecure_channel(address(server)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = stub.ModelStreamInfer()
        await first.write(infer_request(images(1), id="first"))
        assert (await first.read()).infer_response.id == "first"  # the first stream is open and served
        second = stub.ModelStreamInfer()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await second.read()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "ModelStreamInfer streams" in caught.value.details()
        await first.done_writing()
        assert await first.code() == grpc.StatusCode.OK
        deadline = time.monotonic() + 10
        while True:  # the first stream's place is given back once its handler has returned
            third = stub.ModelStreamInfer(iter([infer_request(images(1), id="third")]))
            try:
                assert [answer.infer_response.id async for answer in third] == ["third"]
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, exc


async def test_a_stream_needs_the_auth_token(tiny_repo, start_server):
    server = await start_server(tiny_repo, auth_token="s3cret")
    async with grpc.aio.insecure_channel(address(server)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(iter([infer_request(images(1), id="x")]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [answer async for answer in call]
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call = stub.ModelStreamInfer(iter([infer_request(images(1), id="x")]),
                                     metadata=[("authorization", "Bearer s3cret")])
        assert [answer.infer_response.id async for answer in call] == ["x"]


async def test_a_request_sent_on_an_open_stream_while_draining_is_answered_unavailable(tiny_repo, start_server):
    server = await start_server(tiny_repo)
    async with grpc.aio.insecure_channel(address(server)) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        await call.write(infer_request(images(1), id="before"))
        assert (await call.read()).error_message == ""
        stopping = asyncio.ensure_future(server.shutdown(grace_s=5))
        deadline = time.monotonic() + 5
        while not server.core.draining:
            assert time.monotonic() < deadline, "the server never started draining"
            await asyncio.sleep(0.01)
        await call.write(infer_request(images(1), id="during"))
        answer = await call.read()
        assert answer.infer_response.id == "during"
        assert answer.error_message.startswith("UNAVAILABLE: ")  # a caller may retry it on another replica
        await asyncio.wait_for(stopping, 10)  # an open stream does not hold the shutdown past its grace
        assert await call.code() == grpc.StatusCode.UNAVAILABLE
