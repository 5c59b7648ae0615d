"""The benchmark's Markdown report: targets judged against their bounds, tables and charts from the figures."""

from __future__ import annotations

from convserve_server.bench.report import TARGETS, Target, describe_machine, markdown


def _row(target: str, concurrency: int, images: int, requests_per_s: float, p99_ms: float, **extra) -> dict:
    return {"target": target, "concurrency": concurrency, "images_per_request": images, "requests": 100,
            "requests_per_s": requests_per_s, "images_per_s": requests_per_s * images, "p50_ms": p99_ms / 2,
            "p90_ms": p99_ms * 0.8, "p99_ms": p99_ms, "max_ms": p99_ms * 2, "errors": {}, **extra}


def _report() -> dict:
    steps = [
        _row("convserve", 1, 1, 1500.0, 1.0, mean_batch_size=1.0, server_cpu_us_per_request=400.0),
        _row("do-nothing gRPC", 1, 1, 2000.0, 0.7, server_cpu_us_per_request=300.0),
        _row("convserve", 32, 1, 4000.0, 12.0, mean_batch_size=6.0, server_cpu_us_per_request=300.0),
        _row("do-nothing gRPC", 32, 1, 5000.0, 10.0, server_cpu_us_per_request=200.0),
        _row("convserve", 8, 64, 400.0, 30.0, mean_batch_size=64.0, onnxruntime_images_per_s=64000.0),
        _row("do-nothing gRPC", 8, 64, 1000.0, 15.0),
    ]
    ratios = [
        {"concurrency": 1, "images_per_request": 1, "p50_vs_noop": 1.35},  # missed
        {"concurrency": 32, "images_per_request": 1, "requests_per_s_vs_noop": 0.8, "p99_vs_noop": 1.2,  # met
         "rounds": [{"requests_per_s_vs_noop": 0.9, "p99_vs_noop": 1.1}, {"requests_per_s_vs_noop": 0.7, "p99_vs_noop": 1.4}]},
        {"concurrency": 8, "images_per_request": 64, "images_per_s_vs_onnxruntime": 0.4},  # missed
    ]
    memory = {"rss_peak_mb": 150.0, "rss_run_peak_mb": 160.0, "rss_growth_percent": 6.5, "memory_run_seconds": 60.0}
    return {"machine": describe_machine(), "steps": steps, "ratios": ratios, "server_memory": memory}


def test_a_target_is_met_on_the_right_side_of_its_bound():
    at_least = Target("x", 1, 1, "r", 0.5, at_least=True)
    at_most = Target("x", 1, 1, "r", 1.5, at_least=False)
    assert at_least.met(0.5) and at_least.met(0.7) and not at_least.met(0.49)
    assert at_most.met(1.5) and at_most.met(1.0) and not at_most.met(1.51)
    assert {(t.concurrency, t.images_per_request) for t in TARGETS} == {(32, 1), (1, 1), (8, 64)}


def test_report_marks_each_target_met_or_missed_and_judges_memory():
    lines = markdown(_report()).splitlines()
    judged = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").rsplit("| ", 1)[-1] for line in lines
              if line.startswith("| ") and line.endswith(("| yes |", "| no |"))}
    assert judged == {
        "requests/s vs the do-nothing server": "yes",
        "p99 vs the do-nothing server": "yes",
        "p50 vs the do-nothing server": "no",
        "images/s vs ONNX Runtime in-process": "no",
        "server memory, peak": "yes",
        "server memory growth over 60 s": "no",
    }
    assert "| 160 MB | – | < 400 MB |" in "\n".join(lines)  # the higher of the two peaks


def test_report_shows_how_far_a_targets_rounds_spread():
    text = markdown(_report())
    assert "| requests/s vs the do-nothing server | 32 × 1 | 0.80 | 0.70–0.90 | ≥ 0.75 | yes |" in text
    assert "| p99 vs the do-nothing server | 32 × 1 | 1.20 | 1.10–1.40 | ≤ 1.5 | yes |" in text
    assert "| p50 vs the do-nothing server | 1 × 1 | 1.35 | – | ≤ 1.3 | no |" in text  # no rounds recorded


def test_report_tables_every_row_and_charts_only_sizes_with_several_concurrency_levels():
    text = markdown(_report())
    assert "| 32 × 1 | convserve | 4,000 | 4,000 | 6.00 / 9.60 / 12.00 | 300 | 6.0 | none |" in text
    assert "| 8 × 64 | do-nothing gRPC | 1,000 | 64,000 | 7.50 / 12.00 / 15.00 | – | – | none |" in text
    assert "8 × 64: 64,000 img/s" in text
    machine = describe_machine()
    assert machine["vector_instructions"] in {"AVX-512", "AVX2", "no AVX2", "unknown"}
    assert text.startswith(f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}, {machine['vector_instructions']})")
    assert text.count("xychart-beta") == 2  # single-image requests/s and p99; 64 images has one level only
    assert 'x-axis "concurrency" [1, 32]' in text
    assert "bar [1500, 4000]" in text and "line [2000, 5000]" in text
    assert "bar [1.00, 12.00]" in text and "line [0.70, 10.00]" in text
