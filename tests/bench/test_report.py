"""The composite ceiling's arithmetic, and the Markdown report: targets judged against their bounds, tables, charts."""

from __future__ import annotations

import math

import pytest
from convserve_bench.ceilings import TARGETS, Target, composite, composite_batch, http_ratios, ratios
from convserve_bench.report import describe_machine, markdown


def test_the_model_is_timed_at_batch_32_only_for_single_images_at_concurrency_8_or_more():
    assert composite_batch(1, 1) == 1
    assert composite_batch(4, 1) == 1
    assert composite_batch(8, 1) == 32
    assert composite_batch(32, 1) == 32
    assert composite_batch(8, 64) == 64
    assert composite_batch(1, 64) == 64


def test_the_composite_adds_the_models_median_time_for_the_requests_images_to_the_do_nothing_servers():
    noop = {"requests_per_s": 1000.0, "p50_ms": 0.8}  # 1 ms of server per request
    model = {"batch": 32, "mean_s": 0.0064, "median_s": 0.0032}  # the median run: 100 µs per image
    single = composite(noop, model, 1)
    assert single["requests_per_s"] == pytest.approx(1 / 0.0011)
    assert single["images_per_s"] == pytest.approx(1 / 0.0011)
    assert single["p50_ms"] == pytest.approx(0.9)
    sixty_four = composite(noop, {"batch": 64, "mean_s": 0.0064, "median_s": 0.0064}, 64)
    assert sixty_four["requests_per_s"] == pytest.approx(1 / 0.0074)
    assert sixty_four["images_per_s"] == pytest.approx(64 / 0.0074)
    assert sixty_four["p50_ms"] == pytest.approx(0.8 + 6.4)


def test_ratios_divide_convserve_by_each_reference_and_are_nan_where_a_figure_is_missing():
    served = {"requests_per_s": 900.0, "p50_ms": 1.2}
    naive = {"requests_per_s": 600.0, "p50_ms": 1.5}
    ceiling = {"requests_per_s": 1000.0, "p50_ms": 1.0}
    found = ratios(served, naive, ceiling)
    assert found == pytest.approx({"throughput_vs_composite": 0.9, "p50_vs_composite": 1.2, "throughput_vs_naive": 1.5,
                                   "p50_vs_naive": 0.8, "naive_throughput_vs_composite": 0.6,
                                   "naive_p50_vs_composite": 1.5})
    assert set(ratios(served, None, ceiling)) == {"throughput_vs_composite", "p50_vs_composite"}
    assert ratios(served, None, None) == {}
    assert math.isnan(ratios(served, {"requests_per_s": float("nan"), "p50_ms": 0.0}, None)["p50_vs_naive"])


def test_http_ratios_divide_http_throughput_by_grpcs_and_subtract_grpcs_p50_for_each_encoding_loaded():
    grpc = {"requests_per_s": 1000.0, "p50_ms": 1.0}
    binary = {"requests_per_s": 900.0, "p50_ms": 1.25}
    json = {"requests_per_s": 500.0, "p50_ms": 2.0}
    assert http_ratios(grpc, binary, json) == pytest.approx({
        "http_binary_throughput_vs_grpc": 0.9, "http_binary_p50_minus_grpc_ms": 0.25,
        "http_json_throughput_vs_grpc": 0.5, "http_json_p50_minus_grpc_ms": 1.0})
    assert set(http_ratios(grpc, binary, None)) == {"http_binary_throughput_vs_grpc", "http_binary_p50_minus_grpc_ms"}
    assert http_ratios(grpc, None, None) == {}
    assert math.isnan(http_ratios({"requests_per_s": float("nan"), "p50_ms": 1.0}, binary, None)[
        "http_binary_throughput_vs_grpc"])


def _row(target: str, concurrency: int, images: int, requests_per_s: float, p99_ms: float, **extra) -> dict:
    return {"target": target, "concurrency": concurrency, "images_per_request": images, "requests": 100,
            "requests_per_s": requests_per_s, "images_per_s": requests_per_s * images, "p50_ms": p99_ms / 2,
            "p90_ms": p99_ms * 0.8, "p99_ms": p99_ms, "max_ms": p99_ms * 2, "errors": {}, **extra}


def _report() -> dict:
    steps = [
        _row("convserve", 1, 1, 1500.0, 1.0, mean_batch_size=1.0, server_cpu_us_per_request=400.0),
        _row("convserve HTTP binary", 1, 1, 1400.0, 1.2, mean_batch_size=1.0, server_cpu_us_per_request=420.0),
        _row("convserve HTTP JSON", 1, 1, 1100.0, 1.6, mean_batch_size=1.0, server_cpu_us_per_request=500.0),
        _row("do-nothing", 1, 1, 2000.0, 0.7, server_cpu_us_per_request=300.0),
        _row("naive", 1, 1, 1600.0, 0.9, server_cpu_us_per_request=350.0),
        _row("convserve", 32, 1, 4000.0, 12.0, mean_batch_size=6.0, server_cpu_us_per_request=300.0,
             client_cpu_us_per_request=150.0, host_steal_percent=12.4),
        _row("do-nothing", 32, 1, 5000.0, 10.0, server_cpu_us_per_request=200.0),
        _row("naive", 32, 1, 3000.0, 20.0, server_cpu_us_per_request=250.0),
        _row("convserve", 8, 64, 400.0, 30.0, mean_batch_size=64.0),
        _row("do-nothing", 8, 64, 1000.0, 15.0),
        _row("naive", 8, 64, 200.0, 60.0),
    ]
    in_process = [{"concurrency": 8, "images_per_request": 64, "batch": 64, "runs": 50, "mean_s": 0.0064,
                   "median_s": 0.006, "rounds": []}]
    ceiling = [{"concurrency": 1, "images_per_request": 1, "batch": 1, "requests_per_s": 1800.0,
                "images_per_s": 1800.0, "p50_ms": 0.4, "rounds": []}]
    ratios = [
        {"concurrency": 1, "images_per_request": 1, "p50_vs_composite": 1.25, "p50_vs_naive": 0.95,
         "http_binary_p50_minus_grpc_ms": 0.1,
         "rounds": [{"p50_vs_composite": 1.2, "p50_vs_naive": 0.9, "http_binary_p50_minus_grpc_ms": 0.05},
                    {"p50_vs_composite": 1.3, "p50_vs_naive": 1.1, "http_binary_p50_minus_grpc_ms": 0.35}]},
        {"concurrency": 32, "images_per_request": 1, "throughput_vs_composite": 0.9, "cpu_us_over_noop": 215.0,
         "http_binary_throughput_vs_grpc": 0.85, "http_json_throughput_vs_grpc": 0.55,
         "rounds": [{"throughput_vs_composite": 0.95, "cpu_us_over_noop": 190.0, "http_binary_throughput_vs_grpc": 0.8,
                     "http_json_throughput_vs_grpc": 0.5},
                    {"throughput_vs_composite": 0.8, "cpu_us_over_noop": 240.0, "http_binary_throughput_vs_grpc": 0.9,
                     "http_json_throughput_vs_grpc": 0.6}]},
        {"concurrency": 8, "images_per_request": 64, "throughput_vs_composite": 1.5},  # missed, no rounds
    ]
    memory = {"rss_peak_mb": 150.0, "rss_run_peak_mb": 160.0, "rss_growth_percent": 6.5, "memory_run_seconds": 60.0}
    return {"machine": describe_machine(), "steps": steps, "in_process": in_process, "composite": ceiling,
            "ratios": ratios, "server_memory": memory}


def test_a_target_is_met_on_the_right_side_of_its_bound():
    at_least = Target("x", 1, 1, "r", 0.5, at_least=True)
    at_most = Target("x", 1, 1, "r", 1.5, at_least=False)
    assert at_least.met(0.5) and at_least.met(0.7) and not at_least.met(0.49) and not at_least.met(float("nan"))
    assert at_most.met(1.5) and at_most.met(1.0) and not at_most.met(1.51) and not at_most.met(float("nan"))
    assert {(t.concurrency, t.images_per_request, t.ratio, t.bound) for t in TARGETS} == {
        (32, 1, "throughput_vs_composite", 0.85), (32, 1, "cpu_us_over_noop", 200), (1, 1, "p50_vs_composite", 1.15),
        (8, 64, "throughput_vs_composite", 1.74), (32, 1, "http_binary_throughput_vs_grpc", 0.8),
        (32, 1, "http_json_throughput_vs_grpc", 0.6), (1, 1, "http_binary_p50_minus_grpc_ms", 0.3)}


def test_report_marks_each_target_met_or_missed_and_judges_memory():
    lines = markdown(_report()).splitlines()
    judged = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").rsplit("| ", 1)[-1] for line in lines
              if line.startswith("| ") and line.endswith(("| yes |", "| no |"))}
    assert judged == {
        "throughput vs the composite ceiling": "yes",
        "p50 vs the composite ceiling": "no",
        "server CPU µs per request over the do-nothing server's (median of rounds)": "no",
        "throughput vs the single-threaded composite": "no",
        "HTTP binary tensors' throughput vs gRPC's": "yes",
        "HTTP JSON tensors' throughput vs gRPC's": "no",
        "HTTP binary tensors' p50 − gRPC's, ms": "yes",
        "server memory, peak": "yes",
        "server memory growth over 60 s": "no",
    }
    assert "| 160 MB | – | < 400 MB |" in "\n".join(lines)  # the higher of the two peaks


def test_report_shows_how_far_each_ratios_rounds_spread():
    text = markdown(_report())
    assert "| throughput vs the composite ceiling | 32 × 1 | 0.90 | 0.80–0.95 | ≥ 0.85 | yes |" in text
    assert ("| server CPU µs per request over the do-nothing server's (median of rounds) | 32 × 1 | 215.00 "
            "| 190.00–240.00 | ≤ 200 | no |") in text
    assert "| throughput vs the single-threaded composite | 8 × 64 | 1.50 | – | ≥ 1.74 | no |" in text
    assert "| HTTP binary tensors' throughput vs gRPC's | 32 × 1 | 0.85 | 0.80–0.90 | ≥ 0.8 | yes |" in text
    assert "| HTTP JSON tensors' throughput vs gRPC's | 32 × 1 | 0.55 | 0.50–0.60 | ≥ 0.6 | no |" in text
    assert "| HTTP binary tensors' p50 − gRPC's, ms | 1 × 1 | 0.10 | 0.05–0.35 | ≤ 0.3 | yes |" in text
    # the ratios table has a column for each ratio some step has
    assert "| step | convserve throughput / composite | convserve p50 / composite | convserve p50 / naive |" in text
    assert "| 1 × 1 | – (–) | 1.25 (1.20–1.30) | 0.95 (0.90–1.10) |" in text
    assert text.count("| HTTP binary throughput / gRPC | HTTP JSON throughput / gRPC | HTTP binary p50 − gRPC's, ms |") == 1
    assert "| 32 × 1 | 0.90 (0.80–0.95) | – (–) | – (–) | 215.00 (190.00–240.00) | 0.85 (0.80–0.90) | 0.55 (0.50–0.60) " \
        "| – (–) |" in text


def test_report_tables_every_row_with_the_ceiling_and_charts_only_sizes_with_several_concurrency_levels():
    text = markdown(_report())
    assert "| 32 × 1 | convserve | 4,000 | 4,000 | 6.00 / 9.60 / 12.00 | 300 | 150 | 6.0 | 12 | none |" in text
    assert "| 8 × 64 | do-nothing | 1,000 | 64,000 | 7.50 / 12.00 / 15.00 | – | – | – | – | none |" in text
    assert "| 1 × 1 | composite ceiling (model at batch 1) | 1,800 | 1,800 | 0.40 / – / – | – | – | – | – | – |" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 × 1 | ") and "none |" in line]
    assert [line.split(" | ")[1] for line in rows] == ["convserve", "convserve HTTP binary", "convserve HTTP JSON",
                                                       "naive", "do-nothing"]
    assert "| 1 × 1 | convserve HTTP JSON | 1,100 | 1,100 | 0.80 / 1.28 / 1.60 | 500 | – | 1.0 | – | none |" in text
    assert "8 × 64 at batch 64: 6.000 ms median (93.8 µs per image), 6.400 ms mean" in text
    machine = describe_machine()
    assert machine["vector_instructions"] in {"AVX-512", "AVX2", "no AVX2", "unknown"}
    assert text.startswith(f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}, {machine['vector_instructions']})")
    assert text.count("xychart-beta") == 2  # single-image requests/s and p99; 64 images has one level only
    assert 'x-axis "concurrency" [1, 32]' in text
    assert "bar [1500, 4000]" in text and "line [2000, 5000]" in text and "line [1600, 3000]" in text
    assert "bar [1.00, 12.00]" in text and "line [0.70, 10.00]" in text and "line [0.90, 20.00]" in text
