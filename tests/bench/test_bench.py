"""convserve-bench end to end: it starts a real server and the do-nothing ceiling, loads both, and reports."""

from __future__ import annotations

import json
import sys
import time

import pytest

from convserve_server.bench.cli import main, parse_steps
from tests.process import free_port


def test_bench_reports_both_targets_ratios_memory_a_plot_and_markdown(tiny_repo, tmp_path):
    output = tmp_path / "results"
    status = main(["--model-repository", str(tiny_repo), "--steps", "1x1,2x1,4x8", "--duration", "0.6", "--warmup", "0.2",
                   "--rounds", "2", "--memory-seconds", "1", "--output", str(output)])
    assert status == 0
    report = json.loads((output / "bench.json").read_text())
    targets = {(row["target"], row["concurrency"], row["images_per_request"]) for row in report["steps"]}
    assert targets == {(t, c, i) for t in ("convserve", "do-nothing gRPC") for c, i in ((1, 1), (2, 1), (4, 8))}
    for row in report["steps"]:
        assert row["requests"] > 0 and row["errors"] == {}
        assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert 0 < row["server_cpu_us_per_request"] < 1e6  # both servers were started by the tool: CPU is known
    served = [row for row in report["steps"] if row["target"] == "convserve"]
    assert all(1 <= row["mean_batch_size"] <= 64 for row in served)
    assert all(row["onnxruntime_images_per_s"] > 0 for row in served)  # timed within the step's own rounds
    assert set(report["onnxruntime_images_per_s"]) == {"1", "8"}
    assert all("requests_per_s_vs_noop" in r and "images_per_s_vs_onnxruntime" in r for r in report["ratios"])
    for row in report["steps"]:  # each of the two rounds is reported on its own too
        assert len(row["rounds"]) == 2 and all(part["requests_per_s"] > 0 for part in row["rounds"])
    for ratios in report["ratios"]:
        assert len(ratios["rounds"]) == 2
        assert all(part["requests_per_s_vs_noop"] > 0 and part["images_per_s_vs_onnxruntime"] > 0
                   for part in ratios["rounds"])
    memory = report["server_memory"]
    assert memory["memory_run_requests"] > 0 and memory["memory_run_errors"] == 0
    assert 0 < memory["rss_before_mb"] < 1000
    assert (output / "bench.png").read_bytes().startswith(b"\x89PNG")
    summary = (output / "bench.md").read_text()
    assert sum(line.startswith("| 1 × 1 |") for line in summary.splitlines()) == 2  # both servers
    assert "| server memory growth over 1 s |" in summary
    assert summary.count("xychart-beta") == 2  # requests/s and p99 for the single-image levels


def test_with_several_workers_cpu_memory_and_batches_cover_every_worker(tiny_repo, tmp_path):
    output = tmp_path / "results"
    status = main(["--model-repository", str(tiny_repo), "--server-args", "--workers 2", "--steps", "2x1",
                   "--duration", "0.6", "--warmup", "0.2", "--rounds", "1", "--memory-seconds", "0", "--no-ceilings",
                   "--output", str(output)])
    assert status == 0
    [row] = json.loads((output / "bench.json").read_text())["steps"]
    # The parent process only waits: the CPU and the batches are the workers', whichever got the connection.
    assert row["server_cpu_us_per_request"] > 20
    assert 1 <= row["mean_batch_size"] <= 2


def test_bad_steps_are_a_one_line_error(tiny_repo, capsys):
    assert main(["--model-repository", str(tiny_repo), "--steps", "32"]) == 2
    assert "CONCURRENCYxIMAGES" in capsys.readouterr().err
    assert main(["--model-repository", str(tiny_repo), "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err
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
