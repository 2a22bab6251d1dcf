"""Generic pieces every role's event-loop driver uses: uvloop start-up, signals, one re-armed timer.

The shape (DESIGN.md): feed inputs into a sans-IO machine, drain its ``poll_*`` outputs, and keep
exactly one timer armed at ``poll_timeout()``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import uvloop

log = logging.getLogger(__name__)

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on a fresh uvloop event loop (the only loop fz uses)."""
    return uvloop.run(main)


class DeadlineTimer:
    """One ``call_at`` timer that follows a machine's ``poll_timeout()``.

    ``update(deadline)`` is cheap when the deadline did not change, so drivers call it after
    every batch of input.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._deadline: float | None = None

    def update(self, deadline: float | None) -> None:
        if deadline == self._deadline:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._deadline = deadline
        if deadline is not None:
            self._handle = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._deadline = None
        self._callback()

    def cancel(self) -> None:
        self.update(None)


async def wait_for_signals(*signals: int) -> int:
    """Wait until one of ``signals`` (default SIGINT, SIGTERM) arrives; return its number."""
    sigs = signals or (signal.SIGINT, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()

    def on_signal(s: int) -> None:
        if not fut.done():
            fut.set_result(s)

    for s in sigs:
        loop.add_signal_handler(s, on_signal, s)
    try:
        return await fut
    finally:
        for s in sigs:
            loop.remove_signal_handler(s)


async def first_of(*aws: Awaitable[Any]) -> None:
    """Wait until the first awaitable finishes (re-raising its error), cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
