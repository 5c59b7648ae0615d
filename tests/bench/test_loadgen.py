"""The load generator: a round ends only once it has answers, so a short one on a busy machine still measures."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import orjson
from convserve_bench import rest
from convserve_bench.loadgen import HTTP_BINARY, HTTP_JSON, OIP, WRONG_ANSWER, Step, run_step, summarize
from convserve_bench.processes import ChildServer, ServerProcess, free_port
from convserve_bench.rpc import ServedModel, read_served_model

MODEL = ServedModel(name="any", version="1", input_name="image", output_name="scores", image_shape=(4, 4, 3), classes=2)


def test_a_round_with_no_time_at_all_still_measures_its_minimum_of_answers():
    with ChildServer("convserve_bench.servers", "noop", "--classes", "2", "--output-name", "scores") as noop:
        step = Step(concurrency=3, images_per_request=2, duration_s=0.0, warmup_s=0.0, min_requests=20)
        result = run_step(noop.address, OIP, MODEL, step)
    summary = summarize(step, result)
    assert summary["requests"] >= 20 and summary["errors"] == {}
    assert summary["seconds"] > 0 and summary["requests_per_s"] > 0
    assert summary["images_per_s"] == 2 * summary["requests_per_s"]


def test_a_server_that_never_answers_ends_the_round_with_errors_not_a_hang():
    step = Step(concurrency=2, images_per_request=1, duration_s=0.0, warmup_s=0.0, min_requests=5, max_duration_s=20)
    started = time.monotonic()
    result = run_step(f"127.0.0.1:{free_port()}", OIP, MODEL, step)
    assert time.monotonic() - started < 20
    summary = summarize(step, result)
    assert summary["requests"] == 0 and summary["errors"].get("UNAVAILABLE", 0) >= 5
    assert math.isnan(summary["requests_per_s"]) and math.isnan(summary["p50_ms"])


def test_the_served_model_is_read_from_its_metadata(tiny_repo):
    with ServerProcess(tiny_repo) as server:
        model = read_served_model(server.address, "tiny")
    assert model == ServedModel(name="tiny", version="1", input_name="image", output_name="probabilities",
                                image_shape=(8, 8, 3), classes=4)


def test_the_rest_requests_carry_the_images_as_json_numbers_or_as_raw_bytes_after_the_json_header():
    images = np.random.default_rng(1).random((2, 4, 4, 3), dtype=np.float32)
    as_json = rest.infer_request(rest.JSON, MODEL, images)
    [tensor] = orjson.loads(as_json.body)["inputs"]
    assert as_json.path == "/v2/models/any/infer" and as_json.headers == {"Content-Type": "application/json"}
    assert tensor["name"] == "image" and tensor["shape"] == [2, 4, 4, 3] and tensor["datatype"] == "FP32"
    assert np.array_equal(np.asarray(tensor["data"], dtype=np.float32), images.ravel())
    binary = rest.infer_request(rest.BINARY, MODEL, images)
    length = int(binary.headers["Inference-Header-Content-Length"])
    header = orjson.loads(binary.body[:length])
    assert header == {"inputs": [{"name": "image", "shape": [2, 4, 4, 3], "datatype": "FP32",
                                  "parameters": {"binary_data_size": images.nbytes}}],
                      "parameters": {"binary_data_output": True}}
    assert binary.body[length:] == images.astype("<f4").tobytes()
    assert binary.answer_shape == as_json.answer_shape == (2, 2)


def test_http_json_and_binary_requests_are_answered_with_one_output_row_per_image(tiny_repo):
    step = Step(concurrency=2, images_per_request=3, duration_s=0.0, warmup_s=0.0, min_requests=10)
    with ServerProcess(tiny_repo, http=True) as server:
        model = read_served_model(server.address, "tiny")
        for protocol in (HTTP_BINARY, HTTP_JSON):
            summary = summarize(step, run_step(server.http_address, protocol, model, step))
            assert summary["requests"] >= 10 and summary["errors"] == {}, protocol
            # Answers are checked: expecting 5 classes where the model has 4 makes every answer a wrong one.
            wrong = summarize(step, run_step(server.http_address, protocol, dataclasses.replace(model, classes=5), step))
            assert wrong["requests"] == 0 and wrong["errors"][WRONG_ANSWER] >= 10, protocol
        refused = summarize(step, run_step(server.http_address, HTTP_JSON,
                                           dataclasses.replace(model, input_name="nope"), step))
    assert refused["requests"] == 0 and refused["errors"]["HTTP 400"] >= 10


def test_an_http_port_that_nobody_listens_on_ends_the_round_with_errors_not_a_hang():
    step = Step(concurrency=2, images_per_request=1, duration_s=0.0, warmup_s=0.0, min_requests=5, max_duration_s=20)
    started = time.monotonic()
    summary = summarize(step, run_step(f"127.0.0.1:{free_port()}", HTTP_BINARY, MODEL, step))
    assert time.monotonic() - started < 20
    assert summary["requests"] == 0 and summary["errors"].get("ClientConnectorError", 0) >= 5
