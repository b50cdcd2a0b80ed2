"""Which event loop serves: uvloop where it is installed, asyncio's otherwise.

``gateway serve --loop auto|uvloop|asyncio`` (and the benchmark's contenders, which use
the same choice so that their figures stay comparable). uvloop is a
dependency of the package everywhere but Windows; the gateway behaves the same on
either loop, only faster on uvloop.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["LOOPS", "loop_factory", "resolve", "run"]

T = TypeVar("T")
LOOPS = ("auto", "uvloop", "asyncio")


def resolve(name: str) -> str:
    """``auto`` → ``uvloop`` when importable, else ``asyncio``; others as given."""
    if name not in LOOPS:
        raise ValueError(f"unknown event loop {name!r} (choose from {', '.join(LOOPS)})")
    if name == "auto":
        return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return name


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for ``asyncio.Runner``; ``None`` means asyncio's default loop."""
    if resolve(name) == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as exc:
        if name == "auto":  # found but not importable: asyncio's loop serves as well
            return None
        raise ValueError("--loop uvloop: uvloop is not installed (pip install uvloop)") from exc
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    """``asyncio.run`` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)
