"""What ``convserve-bench`` writes besides its JSON: a PNG plot, and a Markdown report for the README.

The Markdown report holds the results table, the issue's targets marked met or
missed, and the plot again as Mermaid charts, which GitHub draws from text, so
the README can carry the figures of a run without a generated image in the repository.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SERVED = "convserve"  # the target names in the report's rows
NOOP = "do-nothing gRPC"


@dataclass(frozen=True)
class Target:
    """One performance target: a ratio of one step, and the bound it must stay within."""

    what: str
    concurrency: int
    images_per_request: int
    ratio: str  # key in the report's ratios
    bound: float
    at_least: bool  # True: ratio >= bound; False: ratio <= bound

    def met(self, value: float) -> bool:
        """Whether ``value`` of :attr:`ratio` meets the target."""
        return value >= self.bound if self.at_least else value <= self.bound


TARGETS = (
    Target("requests/s vs the do-nothing server", 32, 1, "requests_per_s_vs_noop", 0.75, True),
    Target("p99 vs the do-nothing server", 32, 1, "p99_vs_noop", 1.5, False),
    Target("p50 vs the do-nothing server", 1, 1, "p50_vs_noop", 1.3, False),
    Target("images/s vs ONNX Runtime in-process", 8, 64, "images_per_s_vs_onnxruntime", 0.5, True),
)
MEMORY_LIMIT_MB = 400.0
MEMORY_GROWTH_LIMIT_PERCENT = 5.0


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
    for package in ("onnxruntime", "onnxruntime-gpu", "grpcio", "numpy", "uvloop"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "vector_instructions": vectors, "platform": sys.platform,
            "python": platform.python_version(), "packages": versions}


def write_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Throughput and p99 latency against concurrency, one line per target and request size, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, tail) = plt.subplots(1, 2, figsize=(11, 4))
    for target in sorted({row["target"] for row in rows}):
        for images in sorted({row["images_per_request"] for row in rows}):
            points = sorted((r["concurrency"], r["images_per_s"], r["p99_ms"]) for r in rows
                            if r["target"] == target and r["images_per_request"] == images)
            if points:
                label = f"{target}, {images} img/req"
                throughput.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
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
    parts = [_machine_line(report["machine"]), _results_table(report["steps"]), _targets_table(report)]
    parts.extend(_charts(report["steps"]))
    return "\n\n".join(part for part in parts if part) + "\n"


def _machine_line(machine: dict[str, Any]) -> str:
    packages = ", ".join(f"{name} {release}" for name, release in machine.get("packages", {}).items())
    cpu = ", ".join(part for part in (machine.get("cpu_model", "unknown"), machine.get("vector_instructions")) if part)
    loop = f", event loop {machine['event_loop']}" if "event_loop" in machine else ""
    return (f"Machine: {machine['cpus']} CPUs ({cpu}), {machine['platform']}, "
            f"Python {machine.get('python', '?')}{loop}; {packages}.")


def _number(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _results_table(rows: list[dict[str, Any]]) -> str:
    header = "| step | target | requests/s | images/s | p50 / p90 / p99 ms | server CPU µs/request | mean batch | errors |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["images_per_request"], r["concurrency"], r["target"] != SERVED)):
        latency = f"{row['p50_ms']:.2f} / {row['p90_ms']:.2f} / {row['p99_ms']:.2f}"
        errors = ", ".join(f"{code} {count}" for code, count in row["errors"].items()) or "none"
        lines.append(f"| {row['concurrency']} × {row['images_per_request']} | {row['target']} "
                     f"| {_number(row['requests_per_s'])} | {_number(row['images_per_s'])} | {latency} "
                     f"| {_number(row.get('server_cpu_us_per_request'))} | {_number(row.get('mean_batch_size'), 1)} "
                     f"| {errors} |")
    in_process = [f"{r['concurrency']} × {r['images_per_request']}: {_number(r['onnxruntime_images_per_s'])} img/s"
                  for r in sorted(rows, key=lambda r: (r["images_per_request"], r["concurrency"]))
                  if r.get("onnxruntime_images_per_s")]
    if in_process:
        lines.append("")
        lines.append(f"ONNX Runtime in-process at each step's batch size, timed in its rounds: {'; '.join(in_process)}.")
    return "\n".join(lines)


def _targets_table(report: dict[str, Any]) -> str:
    ratios = {(r["concurrency"], r["images_per_request"]): r for r in report["ratios"]}
    lines = ["| target | step | measured | rounds, lowest–highest | bound | met |", "|---|---|---|---|---|---|"]
    for target in TARGETS:
        entry = ratios.get((target.concurrency, target.images_per_request), {})
        value = entry.get(target.ratio)
        if value is not None:
            sign = "≥" if target.at_least else "≤"
            lines.append(f"| {target.what} | {target.concurrency} × {target.images_per_request} | {value:.2f} "
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
    values = [part[ratio] for part in entry.get("rounds", []) if ratio in part]
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
            series = {shape: [by_target.get((target, level), {}).get(key) for level in levels]
                      for shape, target in (("bar", SERVED), ("line", NOOP))}
            lines = ["```mermaid", "xychart-beta",
                     f'    title "{axis}, {size} per request: bars convserve, line do-nothing server"',
                     f"    x-axis \"concurrency\" [{', '.join(map(str, levels))}]", f'    y-axis "{axis}"']
            lines.extend(f"    {shape} [{', '.join(f'{value:.{digits}f}' for value in values)}]"
                         for shape, values in series.items() if None not in values)
            lines.append("```")
            charts.append("\n".join(lines))
    return charts
