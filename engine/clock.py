"""Clocks: wall time for real runs, virtual time for tests (time skipping).

The engine never calls ``time.time`` or ``asyncio.sleep`` for durable waits directly; it asks
its clock, so tests can run a workflow that sleeps for hours in milliseconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Clock", "RealClock", "VirtualClock"]


class Clock:
    """Wall-clock time in unix seconds and sleeping until a deadline."""

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Mark real work in progress (an agent running); virtual clocks don't skip meanwhile."""
        yield


RealClock = Clock


class VirtualClock(Clock):
    """Time that jumps to the next deadline as soon as nothing else can make progress.

    A waiter is woken when virtual time reaches its deadline. Time advances only while no
    real work is marked ``busy`` and the event loop has had a few turns with nothing new to
    do, so a step timeout does not fire while a (mock) agent is still answering.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()
        self._busy = 0
        self._skipper: asyncio.Task[None] | None = None

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by hand, waking every waiter whose deadline has come."""
        self._set(self._now + seconds)

    def _set(self, t: float) -> None:
        self._now = max(self._now, t)
        while self._waiters and self._waiters[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (deadline, next(self._counter), fut))
        if self._skipper is None or self._skipper.done():
            self._skipper = asyncio.ensure_future(self._skip())
        await fut

    @contextmanager
    def busy(self) -> Iterator[None]:
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    async def _skip(self) -> None:
        quiet = 0
        while True:
            self._waiters = [w for w in self._waiters if not w[2].done()]
            heapq.heapify(self._waiters)
            if not self._waiters:
                return
            await asyncio.sleep(0)
            if self._busy:
                quiet = 0
                await asyncio.sleep(0.001)
                continue
            quiet += 1
            if quiet < 20:
                continue
            quiet = 0
            self._set(self._waiters[0][0])
