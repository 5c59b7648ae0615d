"""``convserve-bench``: load a server step by step and compare it with its two ceilings, in one run.

Ceilings, measured by this same tool in the same run:
  * a do-nothing Open Inference Protocol server (same gRPC stack, no model), for requests/s and latency;
  * ONNX Runtime in this process at the same batch sizes, for images/s, timed within each step's rounds.
With ``--model-repository`` the tool starts ``convserve-serve`` itself and also reports its memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import onnxruntime as ort

from convserve_client.protos import grpc_predict_v2_pb2 as pb
from convserve_client.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server import eventloop
from convserve_server.bench.loadgen import Step, StepResult, run_step, summarize
from convserve_server.bench.report import NOOP, SERVED, describe_machine, markdown, write_plot
from convserve_server.config import load_config
from convserve_server.errors import StartupError
from convserve_server.repository import scan_repository

_PROG = "convserve-bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BenchError(Exception):
    """A failure the tool reports in one line: a server that exited early or never became ready."""


@dataclass
class _Child:
    """A server process this tool started; its stderr goes to a file, read back if it dies early."""

    name: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]

    def last_stderr_line(self) -> str:
        self.log.seek(0)
        lines = [line for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else "(nothing on stderr)"


def _wait_ready(address: str, timeout_s: float, child: _Child | None = None) -> None:
    """Return once the server at ``address`` is ready; :class:`BenchError` if ``child`` exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if child is not None and child.process.poll() is not None:
                raise BenchError(f"{child.name} exited ({child.process.returncode}) before it was ready: "
                                 f"{child.last_stderr_line()}")
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise BenchError(f"no server ready at {address} after {timeout_s:.0f} s")


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it: with ``--workers N`` the server's workers are its children.

    Read once, when the server is ready (its workers are all started by then), so that measuring does not
    scan ``/proc`` on the loaded machine.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # it exited meanwhile
        children.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], [pid]
    while pending:
        tree.append(pending.pop())
        pending.extend(children.get(tree[-1], []))
    return tree


def _rss_mb(pids: list[int]) -> float:
    """Resident memory of a server's processes (NaN once they have exited, never a reassuring 0)."""
    total, read = 0.0, False
    for member in pids:
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except OSError:
            continue
        read = True
        total += sum(int(line.split()[1]) / 1024 for line in lines if line.startswith("VmRSS:"))
    return total if read else float("nan")


def _cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time so far of a server's processes and their threads (0 if none are known)."""
    total = 0
    for member in pids:
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _batch_totals(metrics_ports: list[int]) -> tuple[float, float]:
    """(images, model calls) so far, from the batch-size histograms of every worker's metrics port."""
    total = {"sum": 0.0, "count": 0.0}
    for port in metrics_ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            for key in total:
                if line.startswith(f"convserve_batch_size_{key}{{"):
                    total[key] += float(line.rsplit(" ", 1)[1])
    return total["sum"], total["count"]


def _workers(server_args: list[str]) -> int:
    """How many worker processes ``convserve-serve`` runs with these flags (and the environment)."""
    try:
        return load_config(server_args).workers
    except ValueError:
        return 1  # the server itself will refuse these flags, in its own words


def _model_shape(address: str, model: str) -> tuple[tuple[int, int, int], str]:
    with grpc.insecure_channel(address) as channel:
        metadata = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=10)
    height, width, channels = metadata.inputs[0].shape[1:]
    return (int(height), int(width), int(channels)), metadata.name


def onnxruntime_ceiling(model_path: Path, shape: tuple[int, int, int], batch: int, seconds: float, *,
                        threads: int) -> float:
    """Images/s of ONNX Runtime in this process, at one batch size."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    name = session.get_inputs()[0].name
    for _ in range(5):
        session.run(None, {name: images})
    runs, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        session.run(None, {name: images})
        runs += 1
    return runs * batch / (time.monotonic() - started)


def memory_growth(address: str, protocol: str, model: str, shape: tuple[int, int, int], pids: list[int],
                  concurrency: int, seconds: float, processes: int) -> dict[str, float]:
    """Resident memory of the server's processes ``pids`` before and after ``seconds`` of single-image load,
    sampled each second."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append(_rss_mb(pids))

    run_step(address, protocol, model, shape, Step(concurrency, 1, 2.0, 0.0), processes)  # settle first
    before = _rss_mb(pids)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = run_step(address, protocol, model, shape, Step(concurrency, 1, seconds, 0.0), processes)
    stop.set()
    sampler.join()
    after = _rss_mb(pids)
    print(f"{'memory':>16} c={concurrency:<3} {seconds:.0f} s: RSS {before:.1f} -> {after:.1f} MB "
          f"(peak {max(samples, default=after):.1f}), {len(result.latencies_s)} requests, errors {dict(result.errors)}")
    return {"memory_run_seconds": seconds, "memory_run_requests": len(result.latencies_s),
            "memory_run_errors": sum(result.errors.values()), "rss_before_mb": before, "rss_after_mb": after,
            "rss_run_peak_mb": max(samples, default=after), "rss_growth_percent": 100 * (after - before) / before}


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
    target.add_argument("--target", help="load an already running server at HOST:PORT instead")
    parser.add_argument("--model", default="", help="model name (default: the only one)")
    parser.add_argument("--protocol", choices=["oip", "classifier"], default="oip", help="API to load (default %(default)s)")
    parser.add_argument("--steps", default="1x1,8x1,32x1,8x64", help="CONCURRENCYxIMAGES list (default %(default)s)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per step (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per step (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="each step's measured time is split into this many "
                        "rounds, alternating between the targets, so that a noisy machine's drift hits them alike "
                        "(default %(default)s)")
    parser.add_argument("--processes", type=int, default=1, help="load-generator processes (default %(default)s)")
    parser.add_argument("--server-args", default="", help="extra flags for the convserve-serve it starts")
    parser.add_argument("--event-loop", choices=eventloop.CHOICES, default="auto",
                        help="event loop of both servers it starts, so that the ceiling runs on the same one "
                        "(default %(default)s: uvloop where installed)")
    parser.add_argument("--ready-timeout", type=float, default=120.0,
                        help="seconds to wait for each server to be ready (default %(default)s)")
    parser.add_argument("--no-ceilings", action="store_true", help="skip the do-nothing server and ONNX Runtime runs")
    parser.add_argument("--memory-seconds", type=float, default=60.0,
                        help="with --model-repository: then load it this long at the largest concurrency and "
                        "report resident-memory growth (0 skips; default %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("bench-results"),
                        help="folder for the JSON, the PNG plot and the Markdown report")
    return parser


def _start(args: list[str]) -> _Child:
    """``python -m args``, its stderr kept in a temporary file (a pipe nobody reads could fill and block it)."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the child, in main)
    process = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=log,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return _Child(args[0], process, log)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; prints a table and writes JSON, a PNG plot and a Markdown report."""
    args = build_parser().parse_args(argv)
    try:
        steps = parse_steps(args.steps)
        if args.rounds < 1:
            raise ValueError("--rounds must be at least 1")
        event_loop = eventloop.loop_name(eventloop.loop_factory(args.event_loop))
    except (ValueError, StartupError) as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 2
    children: list[_Child] = []
    server_pid: int | None = None
    metrics_ports: list[int] = []
    model_path: Path | None = None
    try:
        if args.model_repository is not None:
            found = scan_repository(args.model_repository)
            if not found:
                print(f"{_PROG}: error: no model in {args.model_repository} (run make train)", file=sys.stderr)
                return 1
            model_path = found[args.model or next(iter(found))][-1].path
            port, metrics_port = _free_port(), _free_port()
            server_args = args.server_args.split()
            metrics_ports = [metrics_port + worker for worker in range(_workers(server_args))]
            server = _start(["convserve_server", "--model-repository", str(args.model_repository), "--host", "127.0.0.1",
                             "--port", str(port), "--metrics-port", str(metrics_port), "--poll-interval-s", "0",
                             *server_args])
            children.append(server)
            server_pid = server.process.pid
            address = f"127.0.0.1:{port}"
        else:
            address = args.target
        _wait_ready(address, args.ready_timeout, children[0] if children else None)
        shape, model = _model_shape(address, args.model)
        targets = {SERVED: address}
        server_pids = _process_tree(server_pid) if server_pid is not None else []
        pids: dict[str, list[int]] = {SERVED: server_pids}
        if not args.no_ceilings:
            noop_port = _free_port()
            children.append(_start(["convserve_server.bench.noop_server", "--port", str(noop_port),
                                    "--event-loop", args.event_loop]))
            targets[NOOP] = f"127.0.0.1:{noop_port}"
            _wait_ready(targets[NOOP], args.ready_timeout, children[-1])
            pids[NOOP] = _process_tree(children[-1].process.pid)

        rows: list[dict[str, Any]] = []
        memory: dict[str, float] = {}
        ceilings: dict[str, list[float]] = {}
        bench_started = time.monotonic()
        for concurrency, images in steps:
            step = Step(concurrency, images, args.duration, args.warmup)
            ceiling = None
            if model_path is not None and not args.no_ceilings:
                ceiling = functools.partial(onnxruntime_ceiling, model_path, shape, images, threads=0)
            measured, in_process_rounds = _alternate(targets, pids, args.protocol, model, shape, step, args.rounds,
                                                     args.processes, metrics_ports, ceiling)
            in_process = float(np.mean(in_process_rounds)) if in_process_rounds else None
            if in_process is not None:
                ceilings.setdefault(str(images), []).append(in_process)
                print(f"{'onnxruntime':>16} c=-   b={images:<3} {in_process:9.0f} img/s (in process, same rounds)")
            for name in targets:
                result, cpu_seconds, (batched_images, calls), rounds = measured[name]
                row = summarize(step, result)
                row["target"] = name
                row["rounds"] = [_round_summary(step, part) for part in rounds]
                known = row["requests"] and pids.get(name)
                row["server_cpu_us_per_request"] = 1e6 * cpu_seconds / row["requests"] if known else None
                if name == SERVED and metrics_ports:
                    row["mean_batch_size"] = batched_images / calls if calls else float("nan")
                    if server_pids:
                        rss = _rss_mb(server_pids)
                        memory.setdefault("rss_first_step_mb", rss)
                        memory["rss_last_step_mb"] = rss
                        memory["rss_peak_mb"] = max(memory.get("rss_peak_mb", 0.0), rss)
                if name == SERVED and in_process is not None:
                    row["onnxruntime_images_per_s"] = in_process
                    for part, ceiling_images_per_s in zip(row["rounds"], in_process_rounds):
                        part["onnxruntime_images_per_s"] = ceiling_images_per_s
                rows.append(row)
                cpu = row["server_cpu_us_per_request"]
                print(f"{name:>16} c={concurrency:<3} b={images:<3} {row['requests_per_s']:9.0f} req/s "
                      f"{row['images_per_s']:9.0f} img/s  p50 {row['p50_ms']:6.2f}  p99 {row['p99_ms']:6.2f} ms  "
                      f"server CPU {cpu or float('nan'):7.0f} us/req  errors {row['errors'] or 0}", flush=True)
        memory["load_seconds"] = time.monotonic() - bench_started
        if server_pids and args.memory_seconds > 0:
            concurrency = max(c for c, _ in steps)
            memory.update(memory_growth(address, args.protocol, model, shape, server_pids, concurrency,
                                        args.memory_seconds, args.processes))
        report = {"machine": {**describe_machine(), "event_loop": event_loop}, "steps": rows,
                  "onnxruntime_images_per_s": {images: float(np.mean(values)) for images, values in ceilings.items()},
                  "server_memory": memory, "ratios": _ratios(rows)}
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
        write_plot(rows, args.output / "bench.png")
        summary = markdown(report)
        (args.output / "bench.md").write_text(summary)
        print(summary)
        print(f"wrote {args.output / 'bench.json'}, {args.output / 'bench.png'} and {args.output / 'bench.md'}")
        return 0
    except BenchError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for child in children:
            child.process.terminate()
        for child in children:
            child.process.wait(timeout=30)
            child.log.close()


def _alternate(targets: dict[str, str], pids: dict[str, list[int]], protocol: str, model: str,
               shape: tuple[int, int, int], step: Step, rounds: int, processes: int, metrics_ports: list[int],
               ceiling: Callable[[float], float] | None = None,
               ) -> tuple[dict[str, tuple[StepResult, float, tuple[float, float], list[StepResult]]], list[float]]:
    """Load each target for ``step`` in ``rounds`` alternating slices, each round also timing ``ceiling``.

    Per target: the merged results, the server's CPU seconds while measured,
    (images, model calls) from its batch-size metric (zeros where it has none),
    and each round's results; then the ceiling's images/s in each round (half a
    slice each; empty without a ceiling).
    """
    in_process: list[float] = []
    results = {name: StepResult() for name in targets}
    rounds_of: dict[str, list[StepResult]] = {name: [] for name in targets}
    cpu_seconds = dict.fromkeys(targets, 0.0)
    batches = {name: [0.0, 0.0] for name in targets}
    for round_index in range(rounds):
        # The first round warms up fully; later ones only long enough to open their channel.
        warmup = step.warmup_s if round_index == 0 else min(step.warmup_s, 0.2)
        part = Step(step.concurrency, step.images_per_request, step.duration_s / rounds, warmup)
        for name, address in targets.items():
            served = name == SERVED
            members = pids.get(name, [])
            before = _batch_totals(metrics_ports) if served else (0.0, 0.0)
            cpu_at_start: list[float] = []
            timer = threading.Timer(warmup, lambda members=members, mark=cpu_at_start: mark.append(_cpu_seconds(members)))
            timer.start()
            rounds_of[name].append(run_step(address, protocol if served else "oip", model, shape, part, processes))
            results[name].append(rounds_of[name][-1])
            timer.join()
            cpu_seconds[name] += _cpu_seconds(members) - cpu_at_start[0]
            after = _batch_totals(metrics_ports) if served else (0.0, 0.0)
            batches[name][0] += after[0] - before[0]
            batches[name][1] += after[1] - before[1]
        if ceiling is not None:
            in_process.append(ceiling(part.duration_s / 2))
    measured = {name: (results[name], cpu_seconds[name], (batches[name][0], batches[name][1]), rounds_of[name])
                for name in targets}
    return measured, in_process


def _round_summary(step: Step, part: StepResult) -> dict[str, float]:
    """One round's requests/s, images/s and latency percentiles."""
    summary = summarize(step, part)
    return {key: summary[key] for key in ("requests_per_s", "images_per_s", "p50_ms", "p99_ms")}


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """convserve against the do-nothing server and ONNX Runtime (timed in the same rounds), step by step,
    over the whole step and in each of its rounds (how far the rounds spread shows how noisy the machine was)."""
    by_step = {(r["target"], r["concurrency"], r["images_per_request"]): r for r in rows}
    ratios = []
    for (target, concurrency, images), row in by_step.items():
        if target != SERVED:
            continue
        noop = by_step.get((NOOP, concurrency, images))
        entry: dict[str, Any] = {"concurrency": concurrency, "images_per_request": images,
                                 **_step_ratios(row, noop, row.get("onnxruntime_images_per_s"))}
        if noop is not None:
            entry["rounds"] = [_step_ratios(part, noop_part, part.get("onnxruntime_images_per_s"))
                               for part, noop_part in zip(row.get("rounds", []), noop.get("rounds", []))]
        ratios.append(entry)
    return ratios


def _step_ratios(served: dict[str, Any], noop: dict[str, Any] | None, in_process: float | None) -> dict[str, float]:
    ratios = {}
    if noop and noop["requests_per_s"]:
        ratios["requests_per_s_vs_noop"] = served["requests_per_s"] / noop["requests_per_s"]
        ratios["p50_vs_noop"] = served["p50_ms"] / noop["p50_ms"]
        ratios["p99_vs_noop"] = served["p99_ms"] / noop["p99_ms"]
    if in_process:
        ratios["images_per_s_vs_onnxruntime"] = served["images_per_s"] / in_process
    return ratios


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
