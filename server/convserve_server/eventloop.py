"""Which asyncio event loop runs a server: uvloop where it is installed, else asyncio's own.

grpc.aio runs on any asyncio loop.  Every request costs the loop several
callbacks, task steps and wake-ups, and uvloop does each in fewer
microseconds; the loop's thread is what bounds a server's requests per second.
``convserve-serve`` always asks for ``auto``; the other choices are for
development tools that compare the two loops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar, get_args

from convserve_server.errors import StartupError

EventLoop = Literal["auto", "uvloop", "asyncio"]
CHOICES: tuple[str, ...] = get_args(EventLoop)
Result = TypeVar("Result")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: str = "auto") -> LoopFactory | None:
    """The factory of the loop ``choice`` names (None: asyncio's own); StartupError if uvloop is named but missing."""
    if choice not in CHOICES:
        raise ValueError(f"event loop must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise StartupError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
        return None
    return uvloop.new_event_loop


def loop_name(factory: LoopFactory | None) -> str:
    """``uvloop`` or ``asyncio``, for logs and reports."""
    return "asyncio" if factory is None else factory.__module__.split(".")[0]


def run(main: Callable[[], Coroutine[Any, Any, Result]], factory: LoopFactory | None) -> Result:
    """``asyncio.run(main())`` on a loop made by ``factory`` (asyncio's own for None)."""
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())
