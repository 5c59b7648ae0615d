"""The load generator: a round ends only once it has answers, so a short one on a busy machine still measures."""

from __future__ import annotations

import math
import time

from convserve_bench.loadgen import OIP, Step, run_step, summarize
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
