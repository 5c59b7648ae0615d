"""``POST /v2/models/{name}/classify``: image files as a form or as the body, preprocessed on the server under the
limits of gRPC's encoded_images, answered with the label, score and top k of each, and the model that answered."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from convserve_protocol.protos import classifier_pb2 as cpb
from convserve_protocol.protos import classifier_pb2_grpc as cpb_grpc
from convserve_server.http.classify import images_of
from convserve_server.http.messages import Call
from tests.images import bomb_png, encode
from tests.models import write_version
from tests.server.http.serving import ServerThread, running_server
from tests.server.test_decode_limits import many_scan_jpeg
from tests.server.test_server import metric

DIGIT_LABELS = tuple("0123456789")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("http-classify") / "models"
    write_version(repository, "digits", 1, labels=DIGIT_LABELS)
    return repository


@pytest.fixture(scope="module")
def served(repository: Path) -> Iterator[ServerThread]:
    with running_server(repository, max_image_bytes=20_000, max_image_pixels=100_000) as server:
        yield server


def pictures() -> list[bytes]:
    rng = np.random.default_rng(11)
    return [encode(rng.integers(0, 256, (8 + i, 9, 3), dtype=np.uint8), "PNG") for i in range(3)]


def form(files: list[tuple[str, str, bytes, str]], fields: dict[str, str] | None = None) -> tuple[bytes, dict]:
    """A multipart/form-data body, as curl -F writes one: (field, file name, bytes, content type) per file."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in (fields or {}).items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, data, content_type in files:
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def grpc_classification(server: ServerThread, files: list[bytes], top_k: int) -> cpb.ClassifyResponse:
    with grpc.insecure_channel(f"127.0.0.1:{server.server.port}") as channel:
        return cpb_grpc.ClassifierStub(channel).Classify(
            cpb.ClassifyRequest(model_name="digits", encoded_images=files, top_k=top_k), timeout=10)


def test_form_files_are_classified_in_order_as_grpc_classifies_them(served):
    files = pictures()
    body, headers = form([("image", f"picture{i}.png", data, "image/png") for i, data in enumerate(files)])
    answer = served.request("POST", "/v2/models/digits/classify?top_k=3", body, headers)
    assert answer.status == 200, answer.body
    result = answer.json()
    assert (result["model_name"], result["model_version"]) == ("digits", "1")
    assert result["execution_provider"] == "CPUExecutionProvider" and "verified" in result
    expected = grpc_classification(served, files, 3)
    assert [image["filename"] for image in result["results"]] == ["picture0.png", "picture1.png", "picture2.png"]
    for image, want in zip(result["results"], expected.results):
        assert [entry["label"] for entry in image["top_k"]] == [entry.label for entry in want.top_k]
        assert [entry["score"] for entry in image["top_k"]] == pytest.approx([entry.score for entry in want.top_k])
        assert (image["label"], image["score"]) == (image["top_k"][0]["label"], image["top_k"][0]["score"])


def test_one_image_as_the_raw_body_and_top_k_as_a_form_field(served):
    picture = pictures()[0]
    raw = served.request("POST", "/v2/models/digits/versions/1/classify", picture, {"Content-Type": "image/png"})
    assert raw.status == 200, raw.body
    [image] = raw.json()["results"]
    assert image["filename"] is None and len(image["top_k"]) == 5  # five classes unless asked otherwise
    assert image["label"] == grpc_classification(served, [picture], 1).results[0].top_k[0].label
    body, headers = form([("image", "a.png", picture, "image/png")], fields={"top_k": "2"})
    assert len(served.request("POST", "/v2/models/digits/classify", body, headers).json()["results"][0]["top_k"]) == 2


@pytest.mark.parametrize("body_and_headers, status, message", [
    (form([("image", "notes.txt", b"just some text", "text/plain")]), 400, "encoded_images[0]"),
    ((b"just some text", {"Content-Type": "text/plain"}), 415, "multipart/form-data"),
    (form([], fields={"comment": "no file"}), 400, "the form has no file"),
    ((b"--x\r\nbroken", {"Content-Type": "multipart/form-data; boundary=x"}), 400, None),
    (form([("image", "a.png", b"", "image/png")], fields={"top_k": "many"}), 400, "top_k"),
    (form([("image", "a.png", pictures()[0], "image/png")], fields={"top_k": "11"}), 400, "top_k must be between"),
])
def test_what_is_not_an_image_is_refused_with_the_reason(served, body_and_headers, status, message):
    body, headers = body_and_headers
    answer = served.request("POST", "/v2/models/digits/classify", body, headers)
    assert answer.status == status, answer.body
    assert message is None or message in answer.json()["error"]


@pytest.mark.parametrize("top_k", ["%C2%B2", "%C2%B3", "9" * 5000])
def test_a_top_k_that_is_no_short_ascii_number_is_400(served, top_k):
    answer = served.request("POST", f"/v2/models/digits/classify?top_k={top_k}", pictures()[0],
                            {"Content-Type": "image/png"})
    assert answer.status == 400, answer.body
    assert "top_k must be a whole number" in answer.json()["error"]


def test_the_limits_of_encoded_images_apply(served):
    noise = encode(np.random.default_rng(0).integers(0, 256, (90, 90, 3), dtype=np.uint8), "PNG")
    assert len(noise) > 20_000
    too_many_bytes = served.request("POST", "/v2/models/digits/classify", noise, {"Content-Type": "image/png"})
    assert too_many_bytes.status == 400 and "--max-image-bytes" in too_many_bytes.json()["error"]
    bomb = served.request("POST", "/v2/models/digits/classify", bomb_png(12_000), {"Content-Type": "image/png"})
    assert bomb.status == 400 and "--max-image-pixels" in bomb.json()["error"]
    assert served.request("POST", "/v2/models/digits/classify", pictures()[0],
                          {"Content-Type": "image/png"}).status == 200  # and the server still answers


def test_a_large_form_is_parsed_off_the_event_loop(repository):
    """A 60 MiB form of 1,000 files whose bytes keep python-multipart's boundary search busy (about half a second
    of parsing here): meanwhile the server's loop keeps turning, as a health check needs it to."""
    noise = b"a\r\n-" * (60 * 1024 // 4)
    body, headers = form([("image", f"{index}.png", noise, "image/png") for index in range(1000)],
                         fields={"top_k": "bad"})  # refused once parsed, so that the parse is all the call does
    started = time.monotonic()
    images_of(Call({}, {}, {"content-type": headers["Content-Type"]}, body))
    parse_s = time.monotonic() - started
    with running_server(repository, http_max_body_bytes=2 * len(body)) as server:
        stop = threading.Event()
        gaps = asyncio.run_coroutine_threadsafe(loop_gaps(stop), server.loop)
        try:
            answer = server.request("POST", "/v2/models/digits/classify", body, headers, timeout=60)
        finally:
            stop.set()
        assert answer.status == 400 and "top_k" in answer.json()["error"]
        longest = max(gaps.result(10))
    assert longest < parse_s / 2, f"the loop stood still for {longest:.3f} s of a {parse_s:.3f} s parse"


async def loop_gaps(stop: threading.Event) -> list[float]:
    """The times between turns of the running loop, asking for one every millisecond, until ``stop`` is set."""
    gaps, last = [], time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    return gaps


def test_a_timeout_bounds_the_call_as_tritons_timeout_parameter_does(served):
    picture = pictures()[0]
    late = served.request("POST", "/v2/models/digits/classify?timeout=1", picture, {"Content-Type": "image/png"})
    assert late.status == 504 and "deadline" in late.json()["error"]
    body, headers = form([("image", "a.png", picture, "image/png")], fields={"timeout": "10000000"})
    assert served.request("POST", "/v2/models/digits/classify", body, headers).status == 200
    bad = served.request("POST", "/v2/models/digits/classify?timeout=soon", picture, {"Content-Type": "image/png"})
    assert bad.status == 400 and "timeout must be a whole number of microseconds" in bad.json()["error"]


def test_a_caller_that_goes_away_stops_its_decode(repository):
    hostile = many_scan_jpeg(4000, 3000)  # half a minute of decoding
    cancelled = 'convserve_requests_total{code="CANCELLED",method="Classify",model="digits"}'
    with running_server(repository, decode_timeout_s=60) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
            connection.sendall(f"POST /v2/models/digits/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                               f"Content-Length: {len(hostile)}\r\n\r\n".encode() + hostile)
            deadline = time.monotonic() + 10
            while not server.server.decoder.decode_process_ids():
                assert time.monotonic() < deadline, "the decode never started"
                time.sleep(0.01)
        gone_by = time.monotonic() + 5
        while server.server.decoder.decode_process_ids():  # killed, to be replaced when next needed
            assert time.monotonic() < gone_by, "the decode went on after its caller went away"
            time.sleep(0.01)
        while metric(server.server, cancelled) != 1:  # counted once the call has unwound, on the server's loop
            assert time.monotonic() < gone_by, "the call was not counted as CANCELLED"
            time.sleep(0.01)
        assert server.request("POST", "/v2/models/digits/classify", pictures()[0],
                              {"Content-Type": "image/png"}).status == 200


def test_an_unknown_model_is_404(served):
    answer = served.request("POST", "/v2/models/absent/classify", pictures()[0], {"Content-Type": "image/png"})
    assert answer.status == 404 and "absent" in answer.json()["error"]
