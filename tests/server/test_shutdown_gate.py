"""The last stage of a drain: calls after closing are held, then refused; admitted ones are counted."""

from __future__ import annotations

import asyncio
import time

import pytest
from convserve_server.shutdown_gate import ShutdownGate
from convserve_server.errors import ModelNotReady


async def admitted_call(gate: ShutdownGate, started: asyncio.Event, finish: asyncio.Event) -> str:
    async with gate.call():
        started.set()
        await finish.wait()
        return "answered"


async def held_call(gate: ShutdownGate, deadline: float | None = None) -> str:
    async with gate.call(deadline):
        return "ran"  # never reached once the gate is closed


async def test_admitted_calls_finish_and_later_ones_are_held_until_released_then_refused():
    gate = ShutdownGate()
    started, finish = asyncio.Event(), asyncio.Event()
    admitted = asyncio.ensure_future(admitted_call(gate, started, finish))
    await started.wait()
    gate.close()
    held = asyncio.ensure_future(held_call(gate))
    idle = asyncio.ensure_future(gate.wait_idle())
    while gate.held < 1:
        await asyncio.sleep(0)
    assert gate.in_flight == 1 and not idle.done() and not held.done()
    finish.set()
    assert await admitted == "answered"
    await asyncio.wait_for(idle, 5)
    assert not held.done(), "a held call waits for the release"
    gate.release()
    with pytest.raises(ModelNotReady, match="shutting down"):
        await held
    assert gate.held == 0
    with pytest.raises(ModelNotReady):  # after the release, at once
        await asyncio.wait_for(held_call(gate), 5)


async def test_a_held_call_is_refused_before_its_callers_deadline():
    gate = ShutdownGate()
    gate.close()
    deadline = time.monotonic() + 0.3
    with pytest.raises(ModelNotReady):
        await asyncio.wait_for(held_call(gate, deadline), 5)
    assert time.monotonic() < deadline


async def test_settled_once_no_call_has_been_held_for_the_quiet_time():
    gate = ShutdownGate()
    gate.close()
    calls = [asyncio.ensure_future(held_call(gate)) for _ in range(3)]
    begun = time.monotonic()
    await asyncio.wait_for(gate.wait_settled(0.1), 5)
    assert time.monotonic() - begun >= 0.1 and gate.held == 3
    gate.release()
    assert all(isinstance(r, ModelNotReady) for r in await asyncio.gather(*calls, return_exceptions=True))
