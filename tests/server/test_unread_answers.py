"""Callers that never read their answers, and streams that stop in the middle of a message, hold bounded memory
for a bounded time in a real server process; an honest caller on another connection is answered meanwhile.

The attackers are raw HTTP/2 connections (:class:`~tests.server.test_exhaustion.RawHttp2`) that advertise a
receive window of zero, so the server can send them headers and trailers but no answer's bytes.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import grpc.aio
import h2.events
import h2.settings
import numpy as np
import pytest
from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server.admission import UnsentAnswers

from tests.models import write_version
from tests.server.test_exhaustion import (
    AUTH, INFER_PATH, GuardedServer, HonestCaller, RawHttp2, image_request, one_authenticated_call, own_channel,
    rss_after_settling,
)

STREAM_PATH = "/inference.GRPCInferenceService/ModelStreamInfer"
WIDE_LABELS = tuple(f"class {index}" for index in range(1000))  # 1×1 images: 12 bytes in, 4,000 bytes out
OK = "0"
INVALID_ARGUMENT = str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
DEADLINE_EXCEEDED = str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
RESOURCE_EXHAUSTED = str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
MIB = 1 << 20


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("unread") / "models"
    write_version(repository, "tiny", 1)
    return repository


@pytest.fixture(scope="module")
def wide_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose answer is 333 times its request: 1×1 images, 1,000 classes."""
    repository = tmp_path_factory.mktemp("wide") / "models"
    write_version(repository, "wide", 1, labels=WIDE_LABELS, height=1, width=1)
    return repository


def framed(message: pb.ModelInferRequest) -> bytes:
    """A gRPC message: uncompressed, its length, its bytes."""
    data = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


def wide_request(images: int) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="wide")
    message.inputs.add(name="image", datatype="FP32", shape=[images, 1, 1, 3])
    message.raw_input_contents.append(np.full((images, 1, 1, 3), 0.5, "<f4").tobytes())
    return message


class UnreadingHttp2(RawHttp2):
    """A connection whose streams have a receive window of zero: answers are written to it but never read.

    It notes the streams whose response headers arrived: gRPC sends them with the answer, so the server has
    answered those calls, and their answers wait in its buffers.
    """

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        self.flush()
        self.headers_received: set[int] = set()
        self.round_trip()

    def _note(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self.headers_received.add(event.stream_id)
        super()._note(event)

    def flush(self) -> None:
        """Write what h2 has queued, however long the server takes to read it (``pump`` shortens the timeout)."""
        self.sock.settimeout(30)
        super().flush()

    def send_call(self, path: str, body: bytes, end: bool = True) -> int:
        """Open a call and send ``body`` as the server's flow control allows; the stream id."""
        stream = self.open_call(path, AUTH)
        sent, deadline = 0, time.monotonic() + 30
        while sent < len(body):
            room = min(self.conn.local_flow_control_window(stream), self.conn.max_outbound_frame_size, len(body) - sent)
            if room <= 0:
                assert time.monotonic() < deadline and not self.closed, f"the server took {sent} of {len(body)} bytes"
                self.flush()
                self.pump(0.05)
                continue
            self.conn.send_data(stream, body[sent:sent + room], end_stream=end and sent + room == len(body))
            sent += room
        self.flush()
        return stream

    def wait_for(self, stream: int, timeout_s: float = 20) -> str:
        """Read until the server has answered ``stream`` (answer unread: "answered") or ended it (its status)."""
        deadline = time.monotonic() + timeout_s
        while stream not in self.statuses and stream not in self.headers_received:
            assert time.monotonic() < deadline and not self.closed, f"no answer on stream {stream}: {self.statuses}"
            self.pump(0.05)
        return self.statuses.get(stream, "answered")


def test_echoed_ids_are_capped_so_unread_answers_of_huge_ids_cost_no_memory(repository: Path):
    # The case: 100 calls echoing 4 MiB ids took the server from 109 MB to 1,313 MB until the
    # connection closed. 40 of them here (+500 MB before the cap).
    with GuardedServer(repository) as server:
        assert one_authenticated_call(server.address) == grpc.StatusCode.OK
        baseline = rss_after_settling(server, 1.0)
        attacker = UnreadingHttp2(server.address)
        honest = HonestCaller(server.address)
        honest.start()
        message = image_request()
        message.id = "x" * (4 * MIB)
        outcomes = [attacker.wait_for(attacker.send_call(INFER_PATH, framed(message))) for _ in range(40)]
        held = rss_after_settling(server)
        honest.stop()
        attacker.close()
    assert set(outcomes) == {INVALID_ARGUMENT}, outcomes
    assert honest.codes and not honest.failures, honest.failures[:5]
    assert held < baseline + 60, f"{baseline:.0f} MB idle, {held:.0f} MB with 40 huge ids sent and never read"


def test_a_connection_holding_too_many_unread_answer_bytes_is_refused_new_calls(wide_repository: Path):
    with GuardedServer(wide_repository, "--max-unsent-bytes-per-connection", str(4 * MIB)) as server:
        baseline = rss_after_settling(server, 1.0)
        attacker = UnreadingHttp2(server.address)
        one_mib_answer = framed(wide_request(262))  # 262 × 4,000 bytes of probabilities
        outcomes = [attacker.wait_for(attacker.send_call(INFER_PATH, one_mib_answer)) for _ in range(12)]
        held = rss_after_settling(server)
        with own_channel(server.address) as channel:  # another connection is answered, with a large answer too
            answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(wide_request(262), metadata=AUTH, timeout=10)
        attacker.close()
        after_close = rss_after_settling(server)
    # 4 MiB allows four answers; the fifth makes it 5 MiB, and every call after is refused at once.
    assert outcomes == ["answered"] * 5 + [RESOURCE_EXHAUSTED] * 7, outcomes
    assert len(answer.raw_output_contents[0]) == 262 * 4 * len(WIDE_LABELS)
    assert held < baseline + 40, f"{baseline:.0f} MB idle, {held:.0f} MB with 5 MiB of answers unread"
    assert after_close < baseline + 20, f"{baseline:.0f} MB idle, {after_close:.0f} MB once the connection closed"


def test_a_connection_whose_answers_stay_unread_past_the_write_timeout_is_refused_new_calls(wide_repository: Path):
    with GuardedServer(wide_repository, "--write-timeout-s", "1") as server:
        attacker = UnreadingHttp2(server.address)
        large = framed(wide_request(16))  # 64,000 bytes: large enough to be counted
        first = attacker.wait_for(attacker.send_call(INFER_PATH, large))
        second = attacker.wait_for(attacker.send_call(INFER_PATH, large))  # within the timeout
        unread_since = time.monotonic()
        while time.monotonic() - unread_since < 1.5:
            attacker.pump(0.1)
        late = attacker.wait_for(attacker.send_call(INFER_PATH, large))
        with own_channel(server.address) as channel:  # another connection is answered
            answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(wide_request(16), metadata=AUTH, timeout=10)
        attacker.close()
    assert len(answer.raw_output_contents[0]) == 16 * 4 * len(WIDE_LABELS)
    assert (first, second, late) == ("answered", "answered", RESOURCE_EXHAUSTED)


def test_large_unread_answers_hold_their_admission_slot_until_gRPC_has_sent_them(wide_repository: Path):
    with GuardedServer(wide_repository, "--max-concurrent-rpcs", "2") as server:
        attacker = UnreadingHttp2(server.address)
        large = framed(wide_request(16))  # 64,000 bytes: large enough to be counted
        unread = [attacker.wait_for(attacker.send_call(INFER_PATH, large)) for _ in range(2)]
        while_unread = wide_call(server.address)
        attacker.close()  # gRPC finishes its calls: their slots are free again
        deadline = time.monotonic() + 15
        while (after_close := wide_call(server.address)) != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, after_close
    assert unread == ["answered", "answered"]
    assert while_unread == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_small_unread_answers_give_their_slot_back_so_they_cannot_lock_callers_out(repository: Path):
    with GuardedServer(repository, "--max-concurrent-rpcs", "2") as server:
        attacker = UnreadingHttp2(server.address)
        unread = [attacker.wait_for(attacker.send_call(INFER_PATH, framed(image_request()))) for _ in range(8)]
        while_unread = one_authenticated_call(server.address)
        attacker.close()
    assert unread == ["answered"] * 8  # four times the limit, all answered and none read
    assert while_unread == grpc.StatusCode.OK


def wide_call(address: str) -> grpc.StatusCode:
    """One authenticated ModelInfer of the wide model on a connection of its own: its status code."""
    with own_channel(address) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(wide_request(1), metadata=AUTH, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


HALF_SENT_STREAMS = 16
DECLARED_BYTES = 15 * MIB


def half_send_streams(server: GuardedServer, count: int = HALF_SENT_STREAMS) -> UnreadingHttp2:
    """The issue's case: streams that each send all but the last KiB of a message declaring 15 MiB."""
    attacker = UnreadingHttp2(server.address)
    partial = b"\x00" + DECLARED_BYTES.to_bytes(4, "big") + b"\x01" * (DECLARED_BYTES - 1024)
    for _ in range(count):
        attacker.send_call(STREAM_PATH, partial, end=False)
    attacker.round_trip()
    return attacker


def test_half_sent_stream_messages_are_freed_after_the_stream_idle_timeout(repository: Path):
    with GuardedServer(repository, "--stream-idle-timeout-s", "2") as server:
        baseline = rss_after_settling(server, 1.0)
        started = time.monotonic()
        attacker = half_send_streams(server)
        deadline = time.monotonic() + 20
        while len(attacker.statuses) < HALF_SENT_STREAMS:
            assert time.monotonic() < deadline and not attacker.closed, attacker.statuses
            attacker.pump(0.1)
        ended_after = time.monotonic() - started
        after = rss_after_settling(server)
        assert one_authenticated_call(server.address) == grpc.StatusCode.OK
        attacker.close()
    assert set(attacker.statuses.values()) == {DEADLINE_EXCEEDED}
    assert ended_after >= 2
    assert after < baseline + 40, f"{baseline:.0f} MB idle, {after:.0f} MB once the idle streams were ended"


def test_memory_of_half_sent_stream_messages_is_given_back_when_the_connection_closes(repository: Path):
    with GuardedServer(repository) as server:
        baseline = rss_after_settling(server, 1.0)
        attacker = half_send_streams(server)
        held = server.rss_mb()
        attacker.close()
        after = rss_after_settling(server)
    assert held > baseline + 150, "the streams' half-sent messages were not buffered: the test tests nothing"
    assert after < baseline + 40, f"{baseline:.0f} MB idle, {held:.0f} MB held, {after:.0f} MB after closing"


async def test_a_request_id_longer_than_the_cap_is_refused_and_not_echoed(tiny_repo, start_server):
    server = await start_server(tiny_repo)
    long_id = "é" * 513  # 1,026 bytes in UTF-8
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(tiny_request(long_id), timeout=10)
        assert await stub.ModelInfer(tiny_request("é" * 512), timeout=10)  # exactly 1,024 bytes
        answers = [answer async for answer in stub.ModelStreamInfer(iter([tiny_request(long_id), tiny_request("ok")]))]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1024" in caught.value.details()
    refused, answered = sorted(answers, key=lambda answer: answer.infer_response.id)
    assert refused.error_message.startswith("INVALID_ARGUMENT: the request id is 1026 bytes long; at most 1024")
    assert refused.infer_response.id == "" and refused.infer_response.model_name == "tiny"
    assert answered.error_message == "" and answered.infer_response.id == "ok"


async def test_a_stream_that_keeps_sending_is_not_idle_and_one_that_stops_is_ended(tiny_repo, start_server):
    server = await start_server(tiny_repo, stream_idle_timeout_s=0.6)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        busy = stub.ModelStreamInfer()
        for index in range(8):  # 1.6 s in all, never 0.6 s without a request
            await busy.write(tiny_request(str(index)))
            assert (await busy.read()).infer_response.id == str(index)
            await _pause(0.2)
        await busy.done_writing()
        assert await busy.read() is grpc.aio.EOF
        assert await busy.code() == grpc.StatusCode.OK
        idle = stub.ModelStreamInfer()
        await idle.write(tiny_request("only"))
        assert (await idle.read()).infer_response.id == "only"
        with pytest.raises(grpc.aio.AioRpcError) as ended:  # by the server, with the stream still open
            await asyncio.wait_for(idle.read(), 10)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no request message on this stream for 0.6 s" in ended.value.details()


def tiny_request(request_id: str) -> pb.ModelInferRequest:
    message = image_request()
    message.id = request_id
    return message


async def _pause(seconds: float) -> None:
    """Time between a caller's requests (the behaviour under test, not a wait for the server)."""
    await asyncio.sleep(seconds)


def test_unsent_answer_bytes_are_counted_per_connection_until_delivered():
    unsent = UnsentAnswers(limit_bytes=100, write_timeout_s=60)
    assert not unsent.holding and unsent.refusal("ipv4:10.0.0.1:5000") is None
    unsent.hold("ipv4:10.0.0.1:5000", 60)
    assert unsent.refusal("ipv4:10.0.0.1:5000") is None  # within the bound
    unsent.hold("ipv4:10.0.0.1:5000", 60)
    refusal = unsent.refusal("ipv4:10.0.0.1:5000")
    assert refusal is not None and "120 bytes" in refusal and "at most 100" in refusal
    assert unsent.refusal("ipv4:10.0.0.1:5001") is None  # another connection of the same host
    unsent.delivered("ipv4:10.0.0.1:5000", 60)
    assert unsent.refusal("ipv4:10.0.0.1:5000") is None and unsent.held("ipv4:10.0.0.1:5000") == 60
    unsent.delivered("ipv4:10.0.0.1:5000", 60)
    assert not unsent.holding


def test_streams_whose_answers_are_not_read_are_counted_and_ended_after_the_write_timeout(wide_repository: Path):
    with GuardedServer(wide_repository, "--write-timeout-s", "2", "--max-unsent-bytes-per-connection", str(4 * MIB),
                       "--max-inference-streams-per-peer", "8") as server:
        baseline = rss_after_settling(server, 1.0)
        attacker = UnreadingHttp2(server.address)
        started = time.monotonic()
        one_mib_answers = framed(wide_request(262)) * 16  # 8 × 16 × 5 batches: within the queue's 1,024
        streams = [attacker.send_call(STREAM_PATH, one_mib_answers, end=False) for _ in range(8)]
        answered = [attacker.wait_for(stream) for stream in streams]
        held = server.rss_mb()
        refused = attacker.wait_for(attacker.send_call(INFER_PATH, framed(wide_request(1))))
        with own_channel(server.address) as channel:  # another connection, once the streams' slots are free
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            attempts: list[str] = []
            while True:
                request = wide_request(1)
                request.id = "honest"
                try:
                    answer = next(stub.ModelStreamInfer(iter([request]), metadata=AUTH, timeout=10))
                    break
                except grpc.RpcError as exc:
                    attempts.append(f"{exc.code().name}: {exc.details()}")
                    assert time.monotonic() - started < 20 and "too many" in exc.details(), attempts
        slot_free_after = time.monotonic() - started
        after = rss_after_settling(server)
        attacker.close()
    print(f"unread streams: {baseline:.0f} MB idle, {held:.0f} MB held, {after:.0f} MB after the write timeout; "
          f"a stream slot free after {slot_free_after:.1f} s")
    assert answered == ["answered"] * 8
    assert refused == RESOURCE_EXHAUSTED  # 8 MB of the streams' answers wait on that connection
    assert attempts, "the 8 streams that read nothing did not hold their slots"
    assert answer.error_message == "" and answer.infer_response.id == "honest"
    assert slot_free_after >= 2
    assert held > baseline + 50, f"{baseline:.0f} MB idle, {held:.0f} MB: the streams' answers were not computed"
    assert after < baseline + 60, f"{baseline:.0f} MB idle, {held:.0f} MB held, {after:.0f} MB after the write timeout"
