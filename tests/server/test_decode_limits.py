"""Decoding Classify's encoded_images is bounded: in time (the caller's deadline, --decode-timeout-s, a
cancelled call, shutdown), in pixels per request, and in formats; a hot swap never fails a call that is
decoding.  Hostile files are made here: a progressive JPEG repeating one scan thousands of times (tens of
seconds to decode), an ICO or ICNS holding a bomb PNG, and one-bit PNGs declaring 49 megapixels.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import struct
import threading
import time
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
from convserve_bench.processes import ServerProcess, cpu_seconds, process_tree
from PIL import Image, PngImagePlugin

from convserve_protocol.protos import classifier_pb2 as cpb
from convserve_protocol.protos import classifier_pb2_grpc as cpb_grpc
from convserve_server.images import decode_memory_budget
from tests.images import bomb_png, encode
from tests.memory import MIB, peak_rss_bytes, reset_peak_rss
from tests.models import write_version

DEADLINE_S = 1.0
SMALL_CALL_S = 1.0  # the most a small PNG's call may take while hostile images decode (they take 30 s)
JPEG_SOS, JPEG_DHT, JPEG_EOI = 0xDA, 0xC4, 0xD9


# --- hostile files ---------------------------------------------------------------------------


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment after SOI; a scan runs to the next marker that is not a restart."""
    segments, offset = [], 2
    while True:
        marker = data[offset + 1]
        if marker == JPEG_EOI:
            return segments
        end = offset + 2 + struct.unpack_from(">H", data, offset + 2)[0]
        if marker == JPEG_SOS:
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
        segments.append((marker, offset, end))
        offset = end


def many_scan_jpeg(side: int, scans: int) -> bytes:
    """A grey ``side``×``side`` progressive JPEG whose last scan (with its Huffman table) is repeated ``scans``
    times: libjpeg warns of the bogus progression and decodes every scan over every block."""
    data = encode(Image.new("L", (side, side), 128), "JPEG", progressive=True)
    segments = _jpeg_segments(data)
    last_scan = max(index for index, (marker, _, _) in enumerate(segments) if marker == JPEG_SOS)
    first = last_scan - 1 if segments[last_scan - 1][0] == JPEG_DHT else last_scan
    scan = data[segments[first][1] : segments[last_scan][2]]
    return data[: segments[-1][2]] + scan * scans + bytes([0xFF, JPEG_EOI])


def ico_holding(png: bytes) -> bytes:
    """An ICO file with one entry, claiming 256×256, whose image is ``png``."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def icns_holding(png: bytes) -> bytes:
    """An ICNS file with one 1024×1024 ("ic10") entry whose image is ``png``."""
    entry = b"ic10" + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


@pytest.fixture(scope="module")
def hostile_jpeg() -> bytes:
    """About half a minute of decoding on the development machine, in 100 KiB."""
    return many_scan_jpeg(4000, 3000)


@pytest.fixture(scope="module")
def slow_jpeg() -> bytes:
    """About 1.5 s of decoding on the development machine."""
    return many_scan_jpeg(2000, 600)


@pytest.fixture(scope="module")
def small_png() -> bytes:
    return encode(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8), "PNG")


@pytest.fixture(scope="module")
def small_jpeg() -> bytes:
    """A JPEG decoded in a decode process (only small plain PNGs decode in the server's own threads)."""
    return encode(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8), "JPEG")


# --- servers and calls ------------------------------------------------------------------------


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    write_version(repository, "digits", 1, labels=tuple("0123456789"), height=28, width=28)
    return repository


def classify(*images: bytes, model: str = "digits", probabilities: bool = False) -> cpb.ClassifyRequest:
    return cpb.ClassifyRequest(model_name=model, encoded_images=list(images), include_probabilities=probabilities)


async def refusal(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.02)


async def busy_decode_processes(server, count: int) -> list[int]:
    """The decode processes' ids once ``count`` of them are running and using the CPU."""
    start = {}
    deadline = time.monotonic() + 10
    while True:
        pids = server.decoder.decode_process_ids()
        for pid in pids:
            start.setdefault(pid, cpu_seconds([pid]))
        if len(pids) >= count and all(cpu_seconds([pid]) > start[pid] for pid in pids):
            return pids
        assert time.monotonic() < deadline, f"decode processes never got busy: {pids}"
        await asyncio.sleep(0.05)


async def processes_busy_until_done(server, calls: list) -> set[int]:
    """The decode processes seen using the CPU while ``calls`` run, watched until they have all ended."""
    first_seen: dict[int, float] = {}
    busy: set[int] = set()
    while not all(call.done() for call in calls):
        for pid in server.decoder.decode_process_ids():
            used = cpu_seconds([pid])
            if used > first_seen.setdefault(pid, used):
                busy.add(pid)
        await asyncio.sleep(0.02)
    return busy


async def cpu_used_over(seconds: float) -> float:
    """CPU seconds this test process and all its children (servers' decode processes) use in the next
    ``seconds``: a measurement window, not a wait for anything."""
    pids = process_tree(os.getpid())
    before = cpu_seconds(pids)
    await asyncio.sleep(seconds)
    return cpu_seconds(pids) - before


@pytest.fixture
async def server(repository, start_server, small_jpeg):
    server = await start_server(repository)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        # Starts the fork server and a decode process, so that timings below are the steady state's.
        await cpb_grpc.ClassifierStub(channel).Classify(classify(small_jpeg))
    return server


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield cpb_grpc.ClassifierStub(channel)


# --- item 2: time -----------------------------------------------------------------------------


async def test_hostile_decodes_stop_at_the_callers_deadline_while_small_pngs_are_answered(
        server, stub, hostile_jpeg, small_png):
    started = time.monotonic()
    # As many hostile callers as decode processes.
    hostile = [asyncio.ensure_future(stub.Classify(classify(hostile_jpeg), timeout=DEADLINE_S)) for _ in range(2)]
    watching = asyncio.ensure_future(processes_busy_until_done(server, hostile))
    latencies = []
    while not all(call.done() for call in hostile):
        sent = time.monotonic()
        response = await stub.Classify(classify(small_png), timeout=5)
        latencies.append(time.monotonic() - sent)
        assert len(response.results) == 1
    for call in hostile:
        assert (await refusal(call)).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < DEADLINE_S + 3
    assert len(latencies) >= 2 and max(latencies) < SMALL_CALL_S, latencies
    decoding = await watching
    assert len(decoding) == 2, decoding
    # The processes that decoded them are killed, so nothing goes on using the CPU for callers who left.
    await until(lambda: not any(map(running, decoding)), 5, f"decode processes {decoding} killed")
    assert await cpu_used_over(1.0) < 0.3


async def test_a_decode_past_the_time_limit_is_invalid_argument_and_the_next_one_is_served(
        repository, start_server, hostile_jpeg, small_jpeg):
    server = await start_server(repository, decode_timeout_s=DEADLINE_S)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = cpb_grpc.ClassifierStub(channel)
        await stub.Classify(classify(small_jpeg))
        started = time.monotonic()
        call = asyncio.ensure_future(stub.Classify(classify(hostile_jpeg), timeout=30))
        decoding = await processes_busy_until_done(server, [call])
        error = await refusal(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "--decode-timeout-s" in error.details()
        assert time.monotonic() - started < DEADLINE_S + 3
        assert len(decoding) == 1, decoding
        await until(lambda: not any(map(running, decoding)), 5, f"decode process {decoding} killed")
        assert len((await stub.Classify(classify(small_jpeg), timeout=10)).results) == 1


async def test_a_cancelled_call_stops_its_decode(server, stub, hostile_jpeg):
    call = stub.Classify(classify(hostile_jpeg), timeout=30)
    decoding = await busy_decode_processes(server, 1)
    call.cancel()
    await until(lambda: not any(map(running, decoding)), 5, f"decode process {decoding} killed")
    assert await cpu_used_over(1.0) < 0.3


async def test_a_request_declaring_too_many_pixels_in_all_is_refused_before_decoding(stub):
    bomb = bomb_png(7000)  # 49 megapixels, under the per-image limit, in a few KiB
    assert len(bomb) < 16 * 1024
    started = time.monotonic()
    error = await refusal(stub.Classify(classify(*[bomb] * 11)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-request-pixels" in error.details() and "539,000,000" in error.details(), error.details()
    assert time.monotonic() - started < 2.0


async def test_a_decode_process_may_use_no_more_memory_than_its_budget(server):
    (pid,) = server.decoder.decode_process_ids()
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    soft_limit = int(next(line for line in limits if line.startswith("Max address space")).split()[3])
    size = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmSize:"))
    budget = decode_memory_budget(server.config.max_image_pixels)
    assert budget < soft_limit <= size + budget


async def test_a_png_decodes_alike_on_a_server_thread_and_in_a_decode_process(stub, small_png):
    image = Image.open(io.BytesIO(small_png))
    with_text = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "compressed text sends a PNG to a decode process", zip=True)
    image.save(with_text, "PNG", pnginfo=info)
    on_a_thread = await stub.Classify(classify(small_png, probabilities=True))
    in_a_process = await stub.Classify(classify(with_text.getvalue(), probabilities=True))
    assert list(on_a_thread.results[0].probabilities) == list(in_a_process.results[0].probabilities)


# --- item 3: formats --------------------------------------------------------------------------


@pytest.mark.parametrize("container, name", [(ico_holding, "ICO"), (icns_holding, "ICNS")])
async def test_a_container_holding_a_bomb_is_refused_by_format_before_anything_is_decoded(stub, container, name):
    image = container(bomb_png(12_000))
    baseline = reset_peak_rss()
    started = time.monotonic()
    error = await refusal(stub.Classify(classify(image)))
    assert time.monotonic() - started < 1.0
    assert peak_rss_bytes() - baseline < 50 * MIB
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("encoded_images[0]: ") and f"{name} images are not accepted" in error.details()


def gif_with_a_frame_larger_than_its_screen(side: int) -> bytes:
    """A GIF whose screen is 8×8 and whose one frame declares ``side``×``side`` (its pixel data cut short)."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 8, 8, 0x80, 0, 0) + bytes(6)  # a two-colour global palette
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, side, side, 0) + b"\x02\x02\x4c\x01\x00"
    return screen + frame + b"\x3b"


async def test_an_accepted_format_is_measured_by_what_it_decodes_not_by_its_first_header(stub):
    error = await refusal(stub.Classify(classify(gif_with_a_frame_larger_than_its_screen(12_000))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "12000x12000" in error.details() and "--max-image-pixels" in error.details(), error.details()


async def test_accepted_formats_still_decode(stub):
    pixels = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    files = [encode(pixels, image_format) for image_format in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")]
    response = await stub.Classify(classify(*files))
    assert len(response.results) == len(files)


# --- item 4: shutdown -------------------------------------------------------------------------


def test_sigterm_during_a_long_decode_exits_within_the_grace_period(repository, hostile_jpeg):
    grace_s = 3.0
    with ServerProcess(repository, "--grace-period-s", str(grace_s), "--decode-timeout-s", "60") as server:
        tree_cpu_before = cpu_seconds(server.process_tree())
        outcome: list[grpc.StatusCode] = []

        def call() -> None:
            with grpc.insecure_channel(server.address) as channel:
                try:
                    cpb_grpc.ClassifierStub(channel).Classify(classify(hostile_jpeg), timeout=60)
                except grpc.RpcError as exc:
                    outcome.append(exc.code())

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        deadline = time.monotonic() + 20
        while cpu_seconds(server.process_tree()) < tree_cpu_before + 0.5:  # the decode is under way
            assert time.monotonic() < deadline, "the decode never started"
            time.sleep(0.05)
        tree = server.process_tree()
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        status = server.process.wait(timeout=30)
        seconds = time.monotonic() - signalled
        caller.join(timeout=10)
    assert status == 0 and seconds < grace_s, f"exit status {status} after {seconds:.1f} s"
    assert outcome == [grpc.StatusCode.UNAVAILABLE]  # the decode was stopped; the caller may retry elsewhere
    gone_by = time.monotonic() + 5
    while any(map(running, tree)):
        assert time.monotonic() < gone_by, f"left running: {[pid for pid in tree if running(pid)]}"
        time.sleep(0.05)


# --- item 5: hot swap -------------------------------------------------------------------------


@pytest.mark.parametrize("new_size", [28, 16], ids=["same-preprocessing", "new-input-size"])
async def test_a_hot_swap_during_the_decode_is_answered_by_the_new_version(
        repository, start_server, slow_jpeg, small_jpeg, new_size):
    server = await start_server(repository)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = cpb_grpc.ClassifierStub(channel)
        await stub.Classify(classify(small_jpeg))
        cpu_before = cpu_seconds(process_tree(os.getpid()))
        call = stub.Classify(classify(slow_jpeg, small_jpeg), timeout=30)
        # v1 was chosen when the call arrived; wait until its images are decoding.
        await until(lambda: cpu_seconds(process_tree(os.getpid())) > cpu_before + 0.3, 10, "decoding")
        write_version(repository, "digits", 2, labels=tuple("0123456789"), height=new_size, width=new_size)
        await server.core.load_model("digits")  # v2 swapped in, v1 retired
        assert server.core.versions("digits") == [2]
        assert not call.done(), "the decode ended before the swap: make slow_jpeg slower for this machine"
        response = await call
    assert response.model_version == "2" and len(response.results) == 2
