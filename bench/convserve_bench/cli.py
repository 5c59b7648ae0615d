"""``convserve-bench``: load a convserve server step by step beside its references, and judge it, in one run.

convserve is loaded over gRPC and, in the same rounds, over its HTTP/REST port with binary tensors and with
JSON tensors (``--no-http`` leaves HTTP out).
References, measured by this same tool in the same run, in alternating rounds:
  * the do-nothing server: the same gRPC stack and event loop, no model (the cost of gRPC and Python);
  * the naive server: a plain synchronous gRPC server that runs the model in its handler, no batcher;
  * the composite ceiling: the do-nothing server's time per request plus single-threaded ONNX Runtime's
    time for the request's images, timed in this process in the same rounds.
With ``--model-repository`` the tool starts ``convserve-serve`` itself (on the CPU) and also reports its memory.
The input name, image shape and class count come from the served model's metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convserve_bench import ceilings, servers
from convserve_bench.ceilings import HTTP_BINARY, HTTP_JSON, NAIVE, NOOP, SERVED
from convserve_bench.inprocess import InProcessTiming, SingleThreadedModel
from convserve_bench.loadgen import HTTP_BINARY as HTTP_BINARY_PROTOCOL
from convserve_bench.loadgen import HTTP_JSON as HTTP_JSON_PROTOCOL
from convserve_bench.loadgen import OIP, PROTOCOLS, Step, StepResult, run_step, summarize
from convserve_bench.processes import (
    LOOPBACK,
    ChildServer,
    ServerExited,
    ServerNotReady,
    ServerProcess,
    rss_mb,
    wait_until_http_ready,
    wait_until_ready,
    wait_until_serving_metrics,
)
from convserve_bench.report import describe_machine, markdown, write_plot
from convserve_bench.rounds import LoadTarget, Measured, measure_step
from convserve_bench.rpc import ModelUnavailable, ServedModel, read_served_model
from convserve_protocol.repository import VersionPath, scan_repository
from convserve_server import eventloop
from convserve_server.errors import StartupError

_PROG = "convserve-bench"
REFERENCE_SERVERS = "convserve_bench.servers"


class BenchError(Exception):
    """A failure the tool reports in one line."""


def parse_steps(text: str) -> list[tuple[int, int]]:
    """``"1x1,32x1,8x64"`` → [(concurrency, images per request), ...]."""
    steps = []
    for part in text.split(","):
        concurrency, _, images = part.strip().partition("x")
        if not (concurrency.isdigit() and images.isdigit() and int(concurrency) > 0 and int(images) > 0):
            raise ValueError(f"step {part!r} must be CONCURRENCYxIMAGES, e.g. 32x1")
        steps.append((int(concurrency), int(images)))
    return steps


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    parser = argparse.ArgumentParser(prog=_PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model-repository", type=Path, help="start convserve-serve on this repository and load it")
    target.add_argument("--target", help="load an already running server at HOST:PORT instead (no naive server "
                        "and no composite ceiling: the tool has no model file to run)")
    parser.add_argument("--http-target", metavar="HOST:PORT", help="with --target: that server's HTTP/REST port, "
                        "loaded too (without it, --target loads gRPC only)")
    parser.add_argument("--no-http", action="store_true", help="leave HTTP out: load convserve over gRPC only (with "
                        "--model-repository the server is started with no HTTP port)")
    parser.add_argument("--model", default="", help="model to load (default: the one the server serves unnamed calls "
                        "with; name one when the repository holds several)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=OIP, help="convserve's API to load; the reference "
                        "servers always get the Open Inference Protocol (default %(default)s)")
    parser.add_argument("--steps", default="1x1,8x1,32x1,8x64", help="CONCURRENCYxIMAGES list (default %(default)s)")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per step and server, split "
                        "among the rounds (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before a step's first round "
                        "(default %(default)s)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per step, alternating between the servers, so "
                        "that a noisy machine's drift hits them alike (default %(default)s)")
    parser.add_argument("--min-requests", type=int, default=50, help="answers each round waits for even after its "
                        "time is up, so that no round measures nothing (default %(default)s)")
    parser.add_argument("--processes", type=int, default=1, help="load-generator processes (default %(default)s)")
    parser.add_argument("--server-args", default="", help="extra flags for the convserve-serve it starts")
    parser.add_argument("--event-loop", choices=eventloop.CHOICES, default="auto",
                        help="event loop of the do-nothing server (default %(default)s: uvloop where installed, "
                        "as convserve itself always picks)")
    parser.add_argument("--ready-timeout", type=float, default=120.0,
                        help="seconds to wait for each server to be ready (default %(default)s)")
    parser.add_argument("--no-ceilings", action="store_true",
                        help="load convserve alone: no reference servers, no composite ceiling")
    parser.add_argument("--memory-seconds", type=float, default=60.0,
                        help="with --model-repository: then load it this long at the largest concurrency and "
                        "report resident-memory growth (0 skips; default %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("bench-results"),
                        help="folder for the JSON, the PNG plot and the Markdown report")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; prints a table and writes JSON, a PNG plot and a Markdown report."""
    args = build_parser().parse_args(argv)
    try:
        steps = parse_steps(args.steps)
        _check_numbers(args)
        _check_http_flags(args)
        event_loop = servers.loop_name(args.event_loop)
    except (ValueError, StartupError) as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        with contextlib.ExitStack() as stack:
            report = _run(args, steps, event_loop, stack)
    except ServerExited as exc:
        print(f"{_PROG}: error: {exc.one_line()}", file=sys.stderr)
        return 1
    except (ServerNotReady, BenchError) as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    write_plot(report, args.output / "bench.png")
    summary = markdown(report)
    (args.output / "bench.md").write_text(summary)
    print(summary)
    print(f"wrote {args.output / 'bench.json'}, {args.output / 'bench.png'} and {args.output / 'bench.md'}")
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value, least in (("--rounds", args.rounds, 1), ("--min-requests", args.min_requests, 1),
                               ("--processes", args.processes, 1)):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}")
    if args.duration <= 0 or args.warmup < 0 or args.memory_seconds < 0:
        raise ValueError("--duration must be positive, --warmup and --memory-seconds not negative")


def _check_http_flags(args: argparse.Namespace) -> None:
    if args.http_target is not None and args.target is None:
        raise ValueError("--http-target goes with --target (with --model-repository the tool picks the HTTP port)")
    if args.http_target is not None and args.no_http:
        raise ValueError("--http-target and --no-http contradict each other")


def _run(args: argparse.Namespace, steps: list[tuple[int, int]], event_loop: str,
         stack: contextlib.ExitStack) -> dict[str, Any]:
    """Start the servers (stopped when ``stack`` closes), run every step and the memory run; the report."""
    convserve, model, model_path = _start_convserve(args, stack)
    served = convserve[0]
    targets = [*convserve, *_start_references(args, stack, model, model_path)]
    in_process = (SingleThreadedModel(model_path, model.input_name, model.image_shape)
                  if model_path is not None and not args.no_ceilings else None)
    print(f"loading {model.name} version {model.version}: input {model.input_name!r} {list(model.image_shape)}, "
          f"{model.classes} classes; servers: {', '.join(t.name for t in targets)}", flush=True)
    report = _empty_report(args, event_loop, model)
    memory = report["server_memory"]
    started = time.monotonic()
    for concurrency, images in steps:
        step = Step(concurrency, images, args.duration, args.warmup, args.min_requests)
        batch = ceilings.composite_batch(concurrency, images)
        measured, timings = measure_step(targets, model, step, args.rounds, args.processes, in_process, batch)
        rows = {name: _row(step, name, result) for name, result in measured.items()}
        report["steps"].extend(rows.values())
        if served.pids:
            _note_rss(memory, rss_mb(served.pids))
        _print_rows(rows)
        if timings:
            report["in_process"].append(_in_process_entry(step, timings))
        _add_ceiling_and_ratios(report, step, rows, report["in_process"][-1] if timings else None)
    memory["load_seconds"] = time.monotonic() - started
    if served.pids and args.memory_seconds > 0:
        memory.update(memory_growth(served.address, args.protocol, model, served.pids, max(c for c, _ in steps),
                                    args.memory_seconds, args.processes))
    return report


def _start_convserve(args: argparse.Namespace,
                     stack: contextlib.ExitStack) -> tuple[list[LoadTarget], ServedModel, Path | None]:
    """convserve as load targets, gRPC first and then its HTTP port (started here with ``--model-repository``),
    the model it serves, and that model's file (None for ``--target``)."""
    if args.model_repository is None:
        wait_until_ready(args.target, None, args.ready_timeout)
        model = _served_model(args.target, args.model, {})
        if args.http_target is not None:
            wait_until_http_ready(args.http_target, args.ready_timeout)
        return [LoadTarget(SERVED, args.target, args.protocol), *_http_targets(args.http_target)], model, None
    repository = _check_repository(args.model_repository, args.model)
    server = stack.enter_context(ServerProcess(args.model_repository, *_convserve_flags(args),
                                               ready_timeout_s=args.ready_timeout, http=not args.no_http))
    model = _served_model(server.address, args.model, repository)
    metrics_ports = [server.metrics_port + worker for worker in range(_workers(args.server_args))]
    wait_until_serving_metrics(LOOPBACK, metrics_ports, args.ready_timeout)  # every worker started
    if server.http_address is not None:
        wait_until_http_ready(server.http_address, args.ready_timeout)
    pids = server.process_tree()
    # The same process answers both ports; the rounds are sequential, so each target's CPU is its own.
    targets = [LoadTarget(SERVED, server.address, args.protocol, pids, metrics_ports),
               *_http_targets(server.http_address, pids, metrics_ports)]
    return targets, model, _model_file(repository, model)


def _http_targets(address: str | None, pids: list[int] | None = None,
                  metrics_ports: list[int] | None = None) -> list[LoadTarget]:
    """convserve's HTTP port at ``address`` loaded with binary tensors and with JSON tensors (none for None)."""
    if address is None:
        return []
    return [LoadTarget(name, address, protocol, list(pids or []), list(metrics_ports or []))
            for name, protocol in ((HTTP_BINARY, HTTP_BINARY_PROTOCOL), (HTTP_JSON, HTTP_JSON_PROTOCOL))]


def _start_references(args: argparse.Namespace, stack: contextlib.ExitStack, model: ServedModel,
                      model_path: Path | None) -> list[LoadTarget]:
    """The do-nothing server and, given the model's file, the naive server, started (none with --no-ceilings)."""
    if args.no_ceilings:
        return []
    noop = stack.enter_context(ChildServer(REFERENCE_SERVERS, "noop", "--classes", str(model.classes),
                                           "--output-name", model.output_name, "--event-loop", args.event_loop,
                                           ready_timeout_s=args.ready_timeout))
    targets = [LoadTarget(NOOP, noop.address, OIP, noop.process_tree())]
    if model_path is not None:
        naive = stack.enter_context(ChildServer(REFERENCE_SERVERS, "naive", "--model-path", str(model_path),
                                                ready_timeout_s=args.ready_timeout))
        targets.append(LoadTarget(NAIVE, naive.address, OIP, naive.process_tree()))
    return targets


def _empty_report(args: argparse.Namespace, event_loop: str, model: ServedModel) -> dict[str, Any]:
    return {
        "machine": {**describe_machine(), "event_loop": event_loop},
        "settings": {"steps": args.steps, "duration_s": args.duration, "warmup_s": args.warmup,
                     "rounds": args.rounds, "min_requests": args.min_requests, "protocol": args.protocol,
                     "http": not args.no_http and (args.model_repository is not None or args.http_target is not None),
                     "server_args": args.server_args},
        "model": {"name": model.name, "version": model.version, "input_name": model.input_name,
                  "image_shape": list(model.image_shape), "classes": model.classes},
        "steps": [], "in_process": [], "composite": [], "ratios": [], "server_memory": {},
    }


def _check_repository(repository: Path, model: str) -> dict[str, list[VersionPath]]:
    """The repository's models by name; BenchError if it holds none, or not the one named."""
    found = scan_repository(repository)
    if not found:
        raise BenchError(f"no model in {repository} (run make train)")
    if model and model not in found:
        raise BenchError(f"no model {model!r} in {repository}; it holds {', '.join(found)}")
    return found


def _convserve_flags(args: argparse.Namespace) -> list[str]:
    # The model named with --model is the server's default, as a repository of several requires; --server-args
    # come after it and so win. With --no-http the server opens no HTTP port (not Triton's 8000 on every address).
    return ((["--default-model", args.model] if args.model else []) + (["--http-port", "-1"] if args.no_http else [])
            + shlex.split(args.server_args))


def _workers(server_args: str) -> int:
    """How many worker processes ``convserve-serve`` runs with these flags (and the environment)."""
    from convserve_server.config import load_config

    try:
        return load_config(shlex.split(server_args)).workers
    except (ValueError, SystemExit):
        return 1  # the server itself refused these flags already, in its own words


def _served_model(address: str, name: str, repository: dict[str, list[VersionPath]]) -> ServedModel:
    try:
        return read_served_model(address, name)
    except ModelUnavailable as exc:
        hint = f"; name one with --model ({', '.join(repository)})" if not name and len(repository) > 1 else ""
        raise BenchError(f"cannot read the model's metadata: {exc}{hint}") from None


def _model_file(repository: dict[str, list[VersionPath]], model: ServedModel) -> Path:
    """The file of the version the server serves; BenchError if the repository lacks it."""
    for version in repository.get(model.name, []):
        if str(version.version) == model.version:
            return version.path
    raise BenchError(f"the server serves {model.name} version {model.version}, which {_PROG} cannot find on disk")


def _row(step: Step, name: str, measured: Measured) -> dict[str, Any]:
    """One server's figures in one step, with each round's."""
    row = {"target": name, **summarize(step, measured.total)}
    row["rounds"] = [{**_round_summary(step, part), "server_cpu_us_per_request": _cpu_us_per_request(cpu, part.answered),
                      "client_cpu_us_per_request": _cpu_us_per_request(client_cpu, part.answered)}
                     for part, cpu, client_cpu in zip(measured.rounds, measured.round_cpu_seconds,
                                                      measured.round_client_cpu_seconds)]
    row["server_cpu_us_per_request"] = _cpu_us_per_request(measured.cpu_seconds, row["requests"])
    row["client_cpu_us_per_request"] = _cpu_us_per_request(measured.client_cpu_seconds, row["requests"])
    if measured.model_calls:
        row["mean_batch_size"] = measured.batched_images / measured.model_calls
    row["host_steal_percent"] = measured.steal_percent
    return row


def _cpu_us_per_request(cpu_seconds: float, requests: int) -> float | None:
    """CPU (the server's or the load generator's) per answered request, in µs (None where nothing was measured)."""
    return 1e6 * cpu_seconds / requests if requests and cpu_seconds > 0 else None


def _round_summary(step: Step, part: StepResult) -> dict[str, float]:
    """One round's requests/s, images/s and latency percentiles."""
    summary = summarize(step, part)
    return {key: summary[key] for key in ("requests", "seconds", "requests_per_s", "images_per_s", "p50_ms", "p99_ms")}


def _in_process_entry(step: Step, timings: list[InProcessTiming]) -> dict[str, Any]:
    rounds = [{"batch": t.batch, "runs": t.runs, "mean_s": t.mean_s, "median_s": t.median_s} for t in timings]
    return {"concurrency": step.concurrency, "images_per_request": step.images_per_request, "batch": timings[0].batch,
            "runs": sum(t.runs for t in timings), "mean_s": float(np.mean([t.mean_s for t in timings])),
            "median_s": float(np.mean([t.median_s for t in timings])), "rounds": rounds}


def _add_ceiling_and_ratios(report: dict[str, Any], step: Step, rows: dict[str, dict[str, Any]],
                            model: dict[str, Any] | None) -> None:
    """The step's composite ceiling (with the do-nothing server and a timed model) and convserve's ratios,
    over the whole step and in each round: to the references, and its HTTP port's to its gRPC."""
    key = {"concurrency": step.concurrency, "images_per_request": step.images_per_request}
    served, noop, naive = rows[SERVED], rows.get(NOOP), rows.get(NAIVE)
    ceiling = None
    if noop is not None and model is not None:
        ceiling = {**key, "batch": model["batch"], **ceilings.composite(noop, model, step.images_per_request)}
        ceiling["rounds"] = [ceilings.composite(noop_part, model_part, step.images_per_request)
                             for noop_part, model_part in zip(noop["rounds"], model["rounds"])]
        report["composite"].append(ceiling)
    count = len(served["rounds"])
    entry: dict[str, Any] = dict(key)
    per_round: list[dict[str, float]] = [{} for _ in range(count)]
    if ceiling is not None or naive is not None:
        entry.update(ceilings.ratios(served, naive, ceiling, noop))
        for part, parts in zip(per_round, zip(served["rounds"], _rounds(naive, count), _rounds(ceiling, count),
                                              _rounds(noop, count))):
            part.update(ceilings.ratios(*parts))
        if noop is not None:  # judged by the median of the rounds: CPU per request moves with the host's steal
            cpu = [part["cpu_us_over_noop"] for part in per_round if not math.isnan(part["cpu_us_over_noop"])]
            entry["cpu_us_over_noop"] = statistics.median(cpu) if cpu else float("nan")
    if report["settings"]["protocol"] == OIP:  # HTTP's infer is compared with gRPC's ModelInfer, not Classify
        binary, json_tensors = rows.get(HTTP_BINARY), rows.get(HTTP_JSON)
        entry.update(ceilings.http_ratios(served, binary, json_tensors))
        for part, parts in zip(per_round, zip(served["rounds"], _rounds(binary, count), _rounds(json_tensors, count))):
            part.update(ceilings.http_ratios(*parts))
    if len(entry) > len(key):
        entry["rounds"] = per_round
        report["ratios"].append(entry)


def _rounds(row: dict[str, Any] | None, count: int) -> list[Any]:
    """A row's rounds, or ``count`` Nones for a server that was not loaded."""
    return row["rounds"] if row is not None else [None] * count


def _note_rss(memory: dict[str, float], rss: float) -> None:
    memory.setdefault("rss_first_step_mb", rss)
    memory["rss_last_step_mb"] = rss
    memory["rss_peak_mb"] = max(memory.get("rss_peak_mb", 0.0), rss)


def _print_rows(rows: dict[str, dict[str, Any]]) -> None:
    for name, row in rows.items():
        cpu = row["server_cpu_us_per_request"]
        print(f"{name:>21} c={row['concurrency']:<3} b={row['images_per_request']:<3} {row['requests_per_s']:9.0f} req/s "
              f"{row['images_per_s']:9.0f} img/s  p50 {row['p50_ms']:6.2f}  p99 {row['p99_ms']:6.2f} ms  "
              f"server CPU {cpu or float('nan'):7.0f} us/req  client CPU {row['client_cpu_us_per_request'] or float('nan'):6.0f} "
              f"us/req  errors {row['errors'] or 0}", flush=True)


def memory_growth(address: str, protocol: str, model: ServedModel, pids: list[int], concurrency: int,
                  seconds: float, processes: int) -> dict[str, float]:
    """Resident memory of the server's processes ``pids`` before and after ``seconds`` of single-image load,
    sampled each second."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append(rss_mb(pids))

    run_step(address, protocol, model, Step(concurrency, 1, 2.0, 0.0), processes)  # settle first
    before = rss_mb(pids)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = run_step(address, protocol, model, Step(concurrency, 1, seconds, 0.0), processes)
    stop.set()
    sampler.join()
    after = rss_mb(pids)
    print(f"{'memory':>21} c={concurrency:<3} {seconds:.0f} s: RSS {before:.1f} -> {after:.1f} MB "
          f"(peak {max(samples, default=after):.1f}), {len(result.latencies_s)} requests, errors {dict(result.errors)}")
    return {"memory_run_seconds": seconds, "memory_run_requests": len(result.latencies_s),
            "memory_run_errors": sum(result.errors.values()), "rss_before_mb": before, "rss_after_mb": after,
            "rss_run_peak_mb": max(samples, default=after), "rss_growth_percent": 100 * (after - before) / before}


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
