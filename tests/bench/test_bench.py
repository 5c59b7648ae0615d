"""convserve-bench end to end: it starts convserve (gRPC and HTTP) and both reference servers, loads them in rounds,
and reports."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import onnx
import pytest
from convserve_bench.ceilings import TARGETS
from convserve_bench.cli import main, parse_steps
from convserve_bench.processes import ServerProcess, free_port

from tests.models import tiny_model, write_version

MIN_REQUESTS = 50  # the tool's default: answers every round waits for
REFERENCES = ("convserve", "do-nothing", "naive")
HTTP = ("convserve HTTP binary", "convserve HTTP JSON")
SERVERS = (*REFERENCES, *HTTP)


def odd_model(name: str = "odd") -> onnx.ModelProto:
    """A model whose input is called "pixels", 6 × 5 pixels, with 3 classes: nothing like the digits model."""
    model = tiny_model(labels=("red", "green", "blue"), height=6, width=5, name=name)
    model.graph.input[0].name = "pixels"
    model.graph.node[0].input[0] = "pixels"
    for prop in model.metadata_props:
        if prop.key == "convserve.input_name":
            prop.value = "pixels"
    if not any(prop.key == "convserve.input_name" for prop in model.metadata_props):
        model.metadata_props.add(key="convserve.input_name", value="pixels")
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def odd_repo(tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    write_version(repository, "odd", 1, odd_model())
    return repository


def by_step(entries: list[dict]) -> dict[tuple[int, int], dict]:
    return {(entry["concurrency"], entry["images_per_request"]): entry for entry in entries}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def assert_http_ratios_come_from_the_rows(served: dict, binary: dict, json: dict, ratio: dict) -> None:
    assert close(ratio["http_binary_throughput_vs_grpc"], binary["requests_per_s"] / served["requests_per_s"])
    assert close(ratio["http_json_throughput_vs_grpc"], json["requests_per_s"] / served["requests_per_s"])
    assert close(ratio["http_binary_p50_minus_grpc_ms"], binary["p50_ms"] - served["p50_ms"])
    assert close(ratio["http_json_p50_minus_grpc_ms"], json["p50_ms"] - served["p50_ms"])


def test_bench_reports_three_servers_http_the_composite_ceiling_ratios_memory_a_plot_and_markdown(odd_repo, tmp_path):
    output = tmp_path / "results"
    status = main(["--model-repository", str(odd_repo), "--steps", "1x1,8x1,2x8", "--duration", "0.6", "--warmup", "0.2",
                   "--rounds", "2", "--memory-seconds", "1", "--output", str(output)])
    assert status == 0
    report = json.loads((output / "bench.json").read_text())
    # What it loads comes from the served model's metadata, not from assumptions.
    assert report["model"] == {"name": "odd", "version": "1", "input_name": "pixels", "image_shape": [6, 5, 3],
                               "classes": 3}
    rows = {(row["target"], row["concurrency"], row["images_per_request"]): row for row in report["steps"]}
    assert report["settings"]["http"] is True
    assert set(rows) == {(t, c, i) for t in SERVERS for c, i in ((1, 1), (8, 1), (2, 8))}
    for row in report["steps"]:
        assert row["errors"] == {} and row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert 0 < row["server_cpu_us_per_request"] < 1e6  # all three servers were started by the tool
        assert 0 < row["client_cpu_us_per_request"] < 1e6  # the load generator runs in the tool's process
        assert 0 <= row["host_steal_percent"] <= 100  # this is Linux: /proc/stat is there to read
        assert len(row["rounds"]) == 2
        for part in row["rounds"]:  # however busy the machine, no round measures nothing
            assert part["requests"] >= MIN_REQUESTS and part["requests_per_s"] > 0
    for (target, concurrency, images), row in rows.items():
        if target.startswith("convserve"):  # one server process answers gRPC and HTTP: its batches in each's rounds
            assert 1 <= row["mean_batch_size"] <= concurrency * images

    in_process = by_step(report["in_process"])
    assert {step: entry["batch"] for step, entry in in_process.items()} == {(1, 1): 1, (8, 1): 32, (2, 8): 8}
    assert all(len(entry["rounds"]) == 2 and entry["runs"] >= 10 for entry in in_process.values())

    composite, ratios = by_step(report["composite"]), by_step(report["ratios"])
    assert set(composite) == set(ratios) == set(in_process)
    for step, ceiling in composite.items():
        images = step[1]
        served, noop, naive, binary, json_tensors = (rows[(target, *step)] for target in SERVERS)
        # The whole step, then each round, from that round's own figures.
        wholes = [(served, noop, naive, in_process[step], ceiling, ratios[step])]
        parts = list(zip(served["rounds"], noop["rounds"], naive["rounds"], in_process[step]["rounds"],
                         ceiling["rounds"], ratios[step]["rounds"]))
        assert len(parts) == 2
        for served_part, noop_part, naive_part, model, ceiling_part, ratio in wholes + parts:
            model_s = model["median_s"] / model["batch"] * images
            assert close(ceiling_part["requests_per_s"], 1 / (1 / noop_part["requests_per_s"] + model_s))
            assert close(ceiling_part["p50_ms"], noop_part["p50_ms"] + 1000 * model_s)
            assert close(ratio["throughput_vs_composite"], served_part["requests_per_s"] / ceiling_part["requests_per_s"])
            assert close(ratio["p50_vs_composite"], served_part["p50_ms"] / ceiling_part["p50_ms"])
            assert close(ratio["p50_vs_naive"], served_part["p50_ms"] / naive_part["p50_ms"])
            assert close(ratio["naive_throughput_vs_composite"],
                         naive_part["requests_per_s"] / ceiling_part["requests_per_s"])
        # convserve's HTTP port against its own gRPC, over the step and in each round
        for served_part, binary_part, json_part, ratio in zip([served, *served["rounds"]], [binary, *binary["rounds"]],
                                                              [json_tensors, *json_tensors["rounds"]],
                                                              [ratios[step], *ratios[step]["rounds"]]):
            assert_http_ratios_come_from_the_rows(served_part, binary_part, json_part, ratio)

    memory = report["server_memory"]
    assert memory["memory_run_requests"] > 0 and memory["memory_run_errors"] == 0
    assert 0 < memory["rss_before_mb"] < 1000
    assert (output / "bench.png").read_bytes().startswith(b"\x89PNG")
    summary = (output / "bench.md").read_text()
    for server in (*SERVERS, "composite ceiling (model at batch 1)"):
        assert sum(line.startswith(f"| 1 × 1 | {server} |") for line in summary.splitlines()) == 1
    judged = 0
    for target in TARGETS:  # the targets of the steps run are judged, each from its measured ratio and rounds
        entry = ratios.get((target.concurrency, target.images_per_request))
        if entry is None:
            continue
        judged += 1
        lowest, highest = (f(part[target.ratio] for part in entry["rounds"]) for f in (min, max))
        line = (f"| {target.what} | {target.concurrency} × {target.images_per_request} | {entry[target.ratio]:.2f} "
                f"| {lowest:.2f}–{highest:.2f} |")
        assert line in summary
        assert summary.split(line, 1)[1].splitlines()[0].endswith("| yes |" if target.met(entry[target.ratio]) else "| no |")
    assert judged == 2  # the 1 × 1 targets: p50 vs the composite ceiling, HTTP binary p50 less gRPC's
    assert "| server memory growth over 1 s |" in summary
    assert summary.count("xychart-beta") == 2  # requests/s and p99 for the single-image levels


def test_bench_loads_the_model_named_with_model_among_several(odd_repo, tmp_path):
    write_version(odd_repo, "tiny", 1)
    output = tmp_path / "results"
    status = main(["--model-repository", str(odd_repo), "--model", "odd", "--steps", "1x1", "--duration", "0.2",
                   "--warmup", "0", "--rounds", "1", "--min-requests", "5", "--memory-seconds", "0",
                   "--no-ceilings", "--no-http", "--output", str(output)])
    assert status == 0
    report = json.loads((output / "bench.json").read_text())
    assert report["model"]["name"] == "odd" and report["model"]["image_shape"] == [6, 5, 3]
    [row] = report["steps"]  # --no-http: gRPC alone
    assert row["target"] == "convserve" and row["requests"] >= 5 and row["errors"] == {}
    assert report["settings"]["http"] is False and report["ratios"] == []


def test_a_running_server_is_loaded_over_grpc_and_the_http_port_named_with_http_target(tiny_repo, tmp_path):
    output = tmp_path / "results"
    with ServerProcess(tiny_repo, http=True) as server:
        status = main(["--target", server.address, "--http-target", server.http_address, "--model", "tiny",
                       "--steps", "2x1", "--duration", "0.4", "--warmup", "0", "--rounds", "2", "--min-requests", "5",
                       "--memory-seconds", "0", "--no-ceilings", "--output", str(output)])
    assert status == 0
    report = json.loads((output / "bench.json").read_text())
    rows = {row["target"]: row for row in report["steps"]}
    assert set(rows) == {"convserve", *HTTP}
    assert all(row["errors"] == {} and len(row["rounds"]) == 2 for row in rows.values())
    [ratio] = report["ratios"]
    assert len(ratio["rounds"]) == 2
    for parts in zip([rows["convserve"], *rows["convserve"]["rounds"]], [rows[HTTP[0]], *rows[HTTP[0]]["rounds"]],
                     [rows[HTTP[1]], *rows[HTTP[1]]["rounds"]], [ratio, *ratio["rounds"]]):
        assert_http_ratios_come_from_the_rows(*parts)


def test_http_target_needs_target_and_contradicts_no_http(tiny_repo, capsys):
    assert main(["--model-repository", str(tiny_repo), "--http-target", "127.0.0.1:8000"]) == 2
    assert "--http-target goes with --target" in capsys.readouterr().err
    assert main(["--target", "127.0.0.1:8500", "--http-target", "127.0.0.1:8000", "--no-http"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_a_model_the_repository_lacks_is_a_one_line_error(odd_repo, tmp_path, capsys):
    assert main(["--model-repository", str(odd_repo), "--model", "digits", "--output", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"convserve-bench: error: no model 'digits' in {odd_repo}; it holds odd"


def test_with_several_workers_cpu_memory_and_batches_cover_every_worker(tiny_repo, tmp_path):
    output = tmp_path / "results"
    status = main(["--model-repository", str(tiny_repo), "--server-args", "--workers 2", "--steps", "2x1",
                   "--duration", "0.6", "--warmup", "0.2", "--rounds", "1", "--memory-seconds", "0", "--no-ceilings",
                   "--no-http", "--output", str(output)])
    assert status == 0
    [row] = json.loads((output / "bench.json").read_text())["steps"]
    # The parent process only waits: the CPU and the batches are the workers', whichever got the connection.
    assert row["server_cpu_us_per_request"] > 20
    assert 1 <= row["mean_batch_size"] <= 2


def test_bad_numbers_are_a_one_line_error(tiny_repo, capsys):
    assert main(["--model-repository", str(tiny_repo), "--steps", "32"]) == 2
    assert "CONCURRENCYxIMAGES" in capsys.readouterr().err
    assert main(["--model-repository", str(tiny_repo), "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err
    assert main(["--model-repository", str(tiny_repo), "--min-requests", "0"]) == 2
    assert "--min-requests" in capsys.readouterr().err
    with pytest.raises(ValueError):
        parse_steps("0x1")


def test_asking_for_uvloop_where_it_is_missing_is_a_one_line_error(tiny_repo, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert main(["--model-repository", str(tiny_repo), "--event-loop", "uvloop"]) == 2
    assert capsys.readouterr().err.strip() == ("convserve-bench: error: --event-loop uvloop: uvloop is not installed "
                                               "(pip install uvloop)")


def test_a_server_that_cannot_start_is_a_one_line_error_at_once(tiny_repo, tmp_path, capsys):
    started = time.monotonic()
    status = main(["--model-repository", str(tiny_repo), "--server-args", "--max-batch-size 0", "--steps", "1x1",
                   "--output", str(tmp_path)])
    assert status == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("convserve-bench: error: convserve_server exited (2) before it was ready")
    assert "max_batch_size" in error and "\n" not in error
    assert time.monotonic() - started < 60, "it must notice the exit, not wait out the readiness timeout"
    assert not (tmp_path / "bench.json").exists()


def test_a_target_that_never_answers_is_a_one_line_error(tmp_path, capsys):
    address = f"127.0.0.1:{free_port()}"
    assert main(["--target", address, "--ready-timeout", "1", "--steps", "1x1", "--output", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().startswith("convserve-bench: error: no server ready at 127.0.0.1:")
