"""``convserve-serve``: run the server until SIGTERM or SIGINT, then drain and exit 0.

Draining: health readiness turns NOT_SERVING at once, requests are still answered for
``--drain-delay-s`` (a second signal cuts that short), then new ones get UNAVAILABLE and
accepted ones have ``--grace-period-s`` to finish.

Other signals whose default action would end the process at once: SIGHUP rescans the model
repository, as a poll would (like a daemon's reload); SIGUSR1, SIGUSR2 and SIGALRM are ignored with
a log line.  See docs/operations.md, "Signals".
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING, Sequence

from convserve_server import eventloop
from convserve_server.config import ServerConfig, load_config
from convserve_server.errors import StartupError
from convserve_server.ports import check_port_free

if TYPE_CHECKING:
    from convserve_server.app import ConvserveServer

log = logging.getLogger("convserve_server")
_PROG = "convserve-serve"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


_IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)
"""Signals whose default action ends the process with no drain; the server logs and ignores them."""
_NOT_STOPPING_SIGNALS = (signal.SIGHUP, *_IGNORED_SIGNALS)


def _ignore_stray_signals() -> None:
    """Until the event loop's handlers are in place (imports and model loading take seconds), these signals
    are ignored rather than ending the process."""
    for sig in _NOT_STOPPING_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


async def serve(config: ServerConfig) -> None:
    """Start the server, wait for a stop signal, drain, stop."""
    from convserve_server.app import create_server

    server = await create_server(config)
    stop = asyncio.Event()
    started = asyncio.Event()
    rescans: set[asyncio.Task[None]] = set()

    def on_signal() -> None:
        if stop.is_set():
            server.hurry()  # a second signal: skip what is left of the drain delay
        stop.set()

    def on_hangup() -> None:
        if stop.is_set() or not started.is_set():
            log.info("SIGHUP ignored: the server is %s", "stopping" if stop.is_set() else "starting")
            return
        log.info("SIGHUP: rescanning the model repository")
        task = loop.create_task(_rescan(server))
        rescans.add(task)
        task.add_done_callback(rescans.discard)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    for sig in _IGNORED_SIGNALS:
        loop.add_signal_handler(sig, _log_ignored, sig)
    try:
        await server.start()
        started.set()
        _freeze_startup_heap()
        await stop.wait()
        log.info("stop signal received")
    finally:
        for task in rescans:
            task.cancel()
        await server.shutdown()


def _log_ignored(sig: signal.Signals) -> None:
    log.info("%s ignored (SIGTERM or SIGINT stops the server; SIGHUP rescans the model repository)", sig.name)


async def _rescan(server: ConvserveServer) -> None:
    """One repository poll on request; a failure is logged, never fatal."""
    try:
        await server.core.refresh()
    except Exception:
        log.exception("model repository rescan failed")
    else:
        log.info("SIGHUP rescan done: serving %s", ", ".join(server.core.model_names()) or "nothing")


def _freeze_startup_heap() -> None:
    """Exempt everything built at startup (modules, models, gRPC stack) from garbage collection.

    A full collection otherwise walks that whole heap, stopping the event loop for tens of
    milliseconds under load; what requests allocate later is still collected.
    """
    gc.collect()
    gc.freeze()
    log.info("%d objects built at startup exempt from garbage collection", gc.get_freeze_count())


def _configure_logging(config: ServerConfig) -> None:
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    # Pillow logs ERROR lines and warns about malformed images that callers send. The caller is answered
    # INVALID_ARGUMENT with the reason; in the server's log these lines would only let anyone fill it.
    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"PIL\.")
    # uvicorn warns about each malformed HTTP request it answers 400 itself: likewise. Its errors (an exception
    # in the application) still show.
    logging.getLogger("uvicorn.error").setLevel(logging.ERROR)


def _run_worker(config: ServerConfig) -> int:
    _configure_logging(config)
    try:
        factory = eventloop.loop_factory()
        log.info("event loop: %s", eventloop.loop_name(factory))
        eventloop.run(lambda: serve(config), factory)
    except StartupError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_workers(config: ServerConfig) -> int:
    """Several server processes on one port (SO_REUSEPORT); the kernel spreads connections.

    Worker i serves its metrics on the metrics port + i.  If a worker exits with an
    error (it could not start, or it crashed), the others are stopped too and the
    command exits with that status, so that a supervisor sees the failure and
    restarts the whole server rather than it running on quietly with fewer workers.
    """
    _configure_logging(config)
    try:
        check_port_free(config.host, config.port)
    except StartupError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 1
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker_entry, args=(config.for_worker(i), os.getpid()), name=f"worker-{i}")
               for i in range(config.workers)]
    for worker in workers:
        worker.start()

    def forward(signum: int, frame: object) -> None:
        _stop(workers)  # SIGTERM: each worker drains on its own

    def forward_hangup(signum: int, frame: object) -> None:
        log.info("SIGHUP: asking each worker to rescan the model repository")
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward_hangup)
    for sig in _IGNORED_SIGNALS:
        signal.signal(sig, lambda signum, frame: _log_ignored(signal.Signals(signum)))
    status = 0
    running = list(workers)
    while running:
        ended = multiprocessing.connection.wait([worker.sentinel for worker in running])
        for worker in [worker for worker in running if worker.sentinel in ended]:
            worker.join()
            running.remove(worker)
            if worker.exitcode and not status:
                status = worker.exitcode if worker.exitcode > 0 else 1  # negative: killed by a signal
                log.error("%s exited with status %d; stopping the other workers", worker.name, worker.exitcode)
                _stop(running)
    return status


def _stop(workers: list[multiprocessing.process.BaseProcess]) -> None:
    for worker in workers:
        if worker.pid is not None and worker.is_alive():
            worker.terminate()


def _worker_entry(config: ServerConfig, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGTERM instead
    _terminate_with_parent(parent_pid)
    sys.exit(_run_worker(config))


def _terminate_with_parent(parent_pid: int) -> None:
    """Get SIGTERM (and so drain and exit) when the parent dies, even by SIGKILL: no orphan keeps the port."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # it died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch_parent() -> None:  # elsewhere, poll: the parent's death makes this process a child of another
        while os.getppid() == parent_pid:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    _ignore_stray_signals()
    try:
        config = load_config(argv)
    except ValueError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 2
    if config.workers > 1:
        return _run_workers(config)
    return _run_worker(config)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
