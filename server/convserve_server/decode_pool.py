"""A few decode processes, each running one request's decode at a time, killed when its time is up.

Pillow decodes in C without a way to interrupt it: a thread cannot be stopped, so a hostile image (a
progressive JPEG of 1,500 scans decodes for tens of seconds) would go on using the CPU after its caller
gave up.  A process can be killed.  Each job gets a deadline; when it passes, or the awaiting call is
cancelled, or the pool is closed, the process running the job is killed (SIGKILL) and a fresh one
takes its place for the next job.

Processes come from multiprocessing's fork server, which is started once, single-threaded, with the
decoding modules imported: a replacement is forked from it in milliseconds, never from the server
process and its threads.  They are started on the first job, not with the server.  A thread per
process waits on its pipe, so the event loop never blocks on a large reply.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import multiprocessing.connection
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from convserve_server import decode_worker

_KILL_WAIT_S = 5.0  # how long to wait for a killed process to be reaped (SIGKILL takes effect at once)


class DecodeTimeout(Exception):
    """The job's deadline passed before its process answered; the process was killed."""


class DecodeProcessDied(Exception):
    """The process running the job ended without answering (killed by the pool when it closed, or crashed)."""


class PoolClosed(Exception):
    """The pool was closed: it runs no more jobs."""


class _DecodeProcess:
    """One decode process and the server's end of its pipe; started on the first call."""

    def __init__(self, context: Any, memory_budget_bytes: int) -> None:
        self._context = context
        self._memory_budget_bytes = memory_budget_bytes
        self._lock = threading.Lock()  # start and kill may run on different threads
        self._process: multiprocessing.process.BaseProcess | None = None
        self._connection: multiprocessing.connection.Connection | None = None
        self.killed = False

    @property
    def pid(self) -> int | None:
        """The process id, once started and until killed."""
        process = self._process
        return None if process is None or self.killed else process.pid

    def call(self, job: decode_worker.DecodeJob, time_limit_s: float, deadline: float) -> object:
        """Send ``job`` and return the process's answer (blocking: run on a thread).

        DecodeTimeout if none comes within ``time_limit_s`` of the process being ready, or by ``deadline`` (a
        ``time.monotonic()`` instant); DecodeProcessDied if the process ends first.
        """
        connection = self._started()
        try:
            connection.send(job)
            if not connection.poll(max(min(time_limit_s, deadline - time.monotonic()), 0)):
                raise DecodeTimeout()
            return connection.recv()
        except (EOFError, OSError) as exc:
            raise DecodeProcessDied() from exc

    def _started(self) -> multiprocessing.connection.Connection:
        with self._lock:
            if self.killed:
                raise DecodeProcessDied()
            if self._connection is None:
                ours, theirs = self._context.Pipe()
                self._process = self._context.Process(target=decode_worker.serve, name="convserve-decode",
                                                      args=(theirs, self._memory_budget_bytes), daemon=True)
                self._process.start()
                theirs.close()
                self._connection = ours
            return self._connection

    def kill(self) -> None:
        """Kill the process now (SIGKILL), if it runs; a call waiting on it ends with DecodeProcessDied."""
        with self._lock:
            if self.killed:  # and perhaps reaped already: its process object closed
                return
            self.killed = True
            if self._process is not None and self._process.is_alive():
                self._process.kill()

    def reap(self) -> None:
        """Collect the killed process's exit status and close its pipe and sentinel (blocking: run on a thread)."""
        process = self._process
        if process is not None:
            process.join(_KILL_WAIT_S)
            if process.exitcode is not None:
                process.close()
        if self._connection is not None:
            self._connection.close()


class DecodePool:
    """``size`` decode processes; :meth:`run` runs a job on a free one within a deadline."""

    def __init__(self, size: int, memory_budget_bytes: int) -> None:
        context = multiprocessing.get_context("forkserver")
        # The main module too: a child runs a main script again unless the fork server already did.
        context.set_forkserver_preload(
            ["__main__", "convserve_server.decode_worker", "convserve_server.decode_preload"])
        self._new_process = lambda: _DecodeProcess(context, memory_budget_bytes)
        self._free: list[_DecodeProcess] = [self._new_process() for _ in range(size)]
        self._busy: set[_DecodeProcess] = set()
        self._free_count = asyncio.Semaphore(size)
        # One thread per process waits on its pipe; as many again collect killed processes.
        self._threads = ThreadPoolExecutor(max_workers=2 * size, thread_name_prefix="decode-wait")
        self._closed = False

    def pids(self) -> list[int]:
        """Process ids of the decode processes running now (started ones, not yet killed)."""
        return [pid for process in [*self._free, *self._busy] if (pid := process.pid) is not None]

    async def run(self, job: decode_worker.DecodeJob, time_limit_s: float, deadline: float) -> object:
        """``job``'s answer from a decode process, within ``time_limit_s`` of decoding and by ``deadline`` (a
        ``time.monotonic()`` instant).

        Waiting for a free process, or for one to start, counts against the deadline, not the time limit.
        DecodeTimeout when either passes (the process is killed and replaced); PoolClosed once :meth:`close`
        was called; DecodeProcessDied if the process crashed.  If the awaiting task is cancelled, the process
        is killed too.
        """
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                await self._free_count.acquire()
        except TimeoutError:
            raise DecodeTimeout() from None
        try:
            if self._closed:
                raise PoolClosed()
            return await self._run_on(self._free.pop(), job, time_limit_s, deadline)
        finally:
            self._free_count.release()

    async def _run_on(self, process: _DecodeProcess, job: decode_worker.DecodeJob, time_limit_s: float,
                      deadline: float) -> object:
        self._busy.add(process)
        try:
            answer = await asyncio.get_running_loop().run_in_executor(
                self._threads, process.call, job, time_limit_s, deadline)
        except BaseException:
            self._retire(process)
            if self._closed:
                raise PoolClosed() from None
            raise
        self._busy.discard(process)
        self._free.append(process)
        return answer

    def _retire(self, process: _DecodeProcess) -> None:
        """Kill a process whose job ended badly and put a fresh (not yet started) one in its place."""
        process.kill()
        self._busy.discard(process)
        if not self._closed:
            self._threads.submit(process.reap)
            self._free.append(self._new_process())

    def close(self) -> None:
        """Kill every decode process now and run no more jobs; jobs in progress end with PoolClosed.  The killed
        processes are reaped on the pool's threads, not on the caller's."""
        if self._closed:
            return
        self._closed = True
        for process in [*self._free, *self._busy]:
            process.kill()
            self._threads.submit(process.reap)  # queued work still runs after shutdown(wait=False)
        self._free.clear()
        self._threads.shutdown(wait=False)


def _loop_time(monotonic_instant: float) -> float | None:
    """A ``time.monotonic()`` instant on the running loop's clock (None for no deadline)."""
    if math.isinf(monotonic_instant):
        return None
    return asyncio.get_running_loop().time() + (monotonic_instant - time.monotonic())
