"""Choosing the event loop: uvloop where installed (the server always asks for that), asyncio's own where it is
missing or a development tool asks for it."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from convserve_server import eventloop
from convserve_server.errors import StartupError


async def running_loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_the_default_auto_and_uvloop_run_on_uvloop_where_it_is_installed() -> None:
    for factory in (eventloop.loop_factory(), eventloop.loop_factory("auto"), eventloop.loop_factory("uvloop")):
        assert eventloop.loop_name(factory) == "uvloop"
        assert eventloop.run(running_loop_type, factory) is uvloop.Loop


def test_asyncio_runs_on_asyncios_own_loop() -> None:
    factory = eventloop.loop_factory("asyncio")
    assert factory is None and eventloop.loop_name(factory) == "asyncio"
    assert not issubclass(eventloop.run(running_loop_type, factory), uvloop.Loop)


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_startup_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert eventloop.loop_factory() is None
    with pytest.raises(StartupError, match="uvloop is not installed"):
        eventloop.loop_factory("uvloop")


def test_an_unknown_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="event loop must be one of auto, uvloop, asyncio"):
        eventloop.loop_factory("trio")
