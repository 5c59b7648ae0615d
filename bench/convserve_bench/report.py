"""What ``convserve-bench`` writes besides its JSON: a Markdown report and a PNG plot.

The Markdown report holds the results table (with the server's and the load generator's CPU
per request) with each step's composite ceiling, the model's in-process timing, every step's
ratios with their lowest and highest round, the targets marked met or missed, and the plot
again as Mermaid charts, which GitHub draws from text.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from convserve_bench.ceilings import COMPOSITE, HTTP_BINARY, HTTP_JSON, NAIVE, NOOP, SERVED, TARGETS

MEMORY_LIMIT_MB = 400.0
MEMORY_GROWTH_LIMIT_PERCENT = 5.0
RATIO_COLUMNS = (
    ("throughput_vs_composite", "convserve throughput / composite"),
    ("p50_vs_composite", "convserve p50 / composite"),
    ("throughput_vs_naive", "convserve throughput / naive"),
    ("p50_vs_naive", "convserve p50 / naive"),
    ("naive_throughput_vs_composite", "naive throughput / composite"),
    ("naive_p50_vs_composite", "naive p50 / composite"),
    ("cpu_us_over_noop", "convserve CPU µs/request − do-nothing's"),
    ("http_binary_throughput_vs_grpc", "HTTP binary throughput / gRPC"),
    ("http_json_throughput_vs_grpc", "HTTP JSON throughput / gRPC"),
    ("http_binary_p50_minus_grpc_ms", "HTTP binary p50 − gRPC's, ms"),
    ("http_json_p50_minus_grpc_ms", "HTTP JSON p50 − gRPC's, ms"),
)
SERVER_ORDER = (SERVED, HTTP_BINARY, HTTP_JSON, NAIVE, NOOP, COMPOSITE)


def describe_machine() -> dict[str, Any]:
    """The machine and software a run came from, for the report.

    Hosts that all call themselves "AMD EPYC" differ four-fold in ONNX Runtime speed, largely by
    their widest vector instructions, so those are reported too.
    """
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())  # the first CPU's; the others are alike
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    vectors = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "unknown" if not flags else "no AVX2"
    versions = {}
    for package in ("onnxruntime", "onnxruntime-gpu", "grpcio", "numpy", "uvloop", "uvicorn", "aiohttp"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "vector_instructions": vectors, "platform": sys.platform,
            "python": platform.python_version(), "packages": versions}


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Images/s and p99 latency against concurrency, one line per server and request size, as a PNG;
    the composite ceiling's images/s dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["steps"] + [{"target": COMPOSITE, **entry} for entry in report.get("composite", [])]
    figure, (throughput, tail) = plt.subplots(1, 2, figsize=(11, 4))
    for target in [name for name in SERVER_ORDER if any(row["target"] == name for row in rows)]:
        for images in sorted({row["images_per_request"] for row in rows}):
            points = sorted((r["concurrency"], r["images_per_s"], r.get("p99_ms")) for r in rows
                            if r["target"] == target and r["images_per_request"] == images)
            if not points:
                continue
            label = f"{target}, {images} img/req"
            style = "--" if target == COMPOSITE else "-"
            throughput.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=label)
            if target != COMPOSITE:
                tail.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=label)
    for axis, ylabel in ((throughput, "images/s"), (tail, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def markdown(report: dict[str, Any]) -> str:
    """The whole Markdown report of a run."""
    parts = [_machine_line(report["machine"]), _results_table(report), _in_process_line(report.get("in_process", [])),
             _ratios_table(report.get("ratios", [])), _targets_table(report)]
    parts.extend(_charts(report["steps"]))
    return "\n\n".join(part for part in parts if part) + "\n"


def _machine_line(machine: dict[str, Any]) -> str:
    packages = ", ".join(f"{name} {release}" for name, release in machine.get("packages", {}).items())
    cpu = ", ".join(part for part in (machine.get("cpu_model", "unknown"), machine.get("vector_instructions")) if part)
    loop = f", event loop {machine['event_loop']}" if "event_loop" in machine else ""
    return (f"Machine: {machine['cpus']} CPUs ({cpu}), {machine['platform']}, "
            f"Python {machine.get('python', '?')}{loop}; {packages}.")


def _number(value: float | None, digits: int = 0) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _step_order(row: dict[str, Any]) -> tuple[int, int, int]:
    return row["images_per_request"], row["concurrency"], SERVER_ORDER.index(row["target"])


def _results_table(report: dict[str, Any]) -> str:
    header = ("| step | server | requests/s | images/s | p50 / p90 / p99 ms | server CPU µs/request "
              "| load generator CPU µs/request | mean batch | host CPU steal % | errors |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    composite = [{"target": COMPOSITE, **entry} for entry in report.get("composite", [])]
    for row in sorted(report["steps"] + composite, key=_step_order):
        step = f"{row['concurrency']} × {row['images_per_request']}"
        if row["target"] == COMPOSITE:
            lines.append(f"| {step} | composite ceiling (model at batch {row['batch']}) "
                         f"| {_number(row['requests_per_s'])} | {_number(row['images_per_s'])} "
                         f"| {row['p50_ms']:.2f} / – / – | – | – | – | – | – |")
            continue
        latency = f"{row['p50_ms']:.2f} / {row['p90_ms']:.2f} / {row['p99_ms']:.2f}"
        errors = ", ".join(f"{code} {count}" for code, count in row["errors"].items()) or "none"
        lines.append(f"| {step} | {row['target']} | {_number(row['requests_per_s'])} | {_number(row['images_per_s'])} "
                     f"| {latency} | {_number(row.get('server_cpu_us_per_request'))} "
                     f"| {_number(row.get('client_cpu_us_per_request'))} "
                     f"| {_number(row.get('mean_batch_size'), 1)} | {_number(row.get('host_steal_percent'))} | {errors} |")
    return "\n".join(lines)


def _in_process_line(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return ""
    parts = [f"{e['concurrency']} × {e['images_per_request']} at batch {e['batch']}: {1000 * e['median_s']:.3f} ms "
             f"median ({1e6 * e['median_s'] / e['batch']:.1f} µs per image), {1000 * e['mean_s']:.3f} ms mean"
             for e in sorted(entries, key=lambda e: (e["images_per_request"], e["concurrency"]))]
    return (f"Single-threaded ONNX Runtime in this process, per run, timed in each step's rounds (the composite "
            f"ceiling takes the median): {'; '.join(parts)}.")


def _ratios_table(entries: list[dict[str, Any]]) -> str:
    columns = [(key, title) for key, title in RATIO_COLUMNS if any(key in entry for entry in entries)]
    if not columns:
        return ""
    lines = ["Ratios over the whole step, and (in brackets) the lowest and highest of its rounds:", "",
             "| step | " + " | ".join(title for _, title in columns) + " |", "|---|" + "---|" * len(columns)]
    for entry in sorted(entries, key=lambda e: (e["images_per_request"], e["concurrency"])):
        cells = [f"{_number(entry.get(key), 2)} ({_spread(entry, key)})" for key, _ in columns]
        lines.append(f"| {entry['concurrency']} × {entry['images_per_request']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _targets_table(report: dict[str, Any]) -> str:
    ratios = {(r["concurrency"], r["images_per_request"]): r for r in report.get("ratios", [])}
    lines = ["| target | step | measured | rounds, lowest–highest | bound | met |", "|---|---|---|---|---|---|"]
    for target in TARGETS:
        entry = ratios.get((target.concurrency, target.images_per_request), {})
        value = entry.get(target.ratio)
        if value is not None:
            sign = "≥" if target.at_least else "≤"
            lines.append(f"| {target.what} | {target.concurrency} × {target.images_per_request} | {_number(value, 2)} "
                         f"| {_spread(entry, target.ratio)} | {sign} {target.bound} | {'yes' if target.met(value) else 'no'} |")
    memory = report.get("server_memory", {})
    if "rss_growth_percent" in memory:
        peak = max(memory.get("rss_peak_mb", 0.0), memory.get("rss_run_peak_mb", 0.0))
        growth = memory["rss_growth_percent"]
        lines.append(f"| server memory, peak | all steps and the memory run | {peak:.0f} MB | – | < {MEMORY_LIMIT_MB:.0f} MB "
                     f"| {'yes' if peak < MEMORY_LIMIT_MB else 'no'} |")
        lines.append(f"| server memory growth over {memory['memory_run_seconds']:.0f} s | memory run "
                     f"| {growth:+.1f}% | – | < {MEMORY_GROWTH_LIMIT_PERCENT:.0f}% "
                     f"| {'yes' if growth < MEMORY_GROWTH_LIMIT_PERCENT else 'no'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _spread(entry: dict[str, Any], ratio: str) -> str:
    """The lowest and highest value of ``ratio`` among a step's rounds ("–" without rounds)."""
    values = [part[ratio] for part in entry.get("rounds", []) if not math.isnan(part.get(ratio, math.nan))]
    return f"{min(values):.2f}–{max(values):.2f}" if values else "–"


def _charts(rows: list[dict[str, Any]]) -> list[str]:
    """Mermaid charts of requests/s and p99 against concurrency, for each request size with several levels."""
    charts = []
    for images in sorted({row["images_per_request"] for row in rows}):
        levels = sorted({r["concurrency"] for r in rows if r["images_per_request"] == images})
        if len(levels) < 2:
            continue
        by_target = {(r["target"], r["concurrency"]): r for r in rows if r["images_per_request"] == images}
        size = "1 image" if images == 1 else f"{images} images"
        for axis, key, digits in (("requests/s", "requests_per_s", 0), ("p99 latency (ms)", "p99_ms", 2)):
            series = [(shape, [by_target.get((target, level), {}).get(key) for level in levels])
                      for shape, target in (("bar", SERVED), ("line", NOOP), ("line", NAIVE))]
            lines = ["```mermaid", "xychart-beta",
                     f'    title "{axis}, {size} per request: bars convserve, lines do-nothing and naive servers"',
                     f"    x-axis \"concurrency\" [{', '.join(map(str, levels))}]", f'    y-axis "{axis}"']
            lines.extend(f"    {shape} [{', '.join(f'{value:.{digits}f}' for value in values)}]"
                         for shape, values in series if None not in values and not any(map(math.isnan, values)))
            lines.append("```")
            charts.append("\n".join(lines))
    return charts
