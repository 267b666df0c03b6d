"""A bounded number of threads for one kind of request (QF_SUBMIT_THREADS for POST /v1/jobs).

A plain `def` route runs on the default thread pool, up to 40 at once. Under a burst of submits, 20 or 40
threads then take turns at the interpreter lock with the event loop (every database round trip hands it
over twice), which costs more CPU and makes the slowest requests several times slower than the median.
Running submits on at most a few threads keeps one core busy just as well (a submit mostly computes; its
database round trips overlap with the other threads' work), and the rest wait on the event loop, where
waiting costs nothing, in arrival order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar
from weakref import WeakKeyDictionary

import anyio
import anyio.to_thread

T = TypeVar("T")


class ThreadSlots:
    """At most `total` calls of `run` on threads at once, per event loop; later calls wait first come, first
    served (anyio's CapacityLimiter)."""

    def __init__(self, total: int) -> None:
        self.total = total
        # One limiter per event loop: a limiter's waiters belong to the loop they wait on (a server has one
        # loop; a test client may start one per request).
        self._limiters: WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = WeakKeyDictionary()

    def _limiter(self) -> anyio.CapacityLimiter:
        loop = asyncio.get_running_loop()
        limiter = self._limiters.get(loop)
        if limiter is None:
            limiter = self._limiters[loop] = anyio.CapacityLimiter(self.total)
        return limiter

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """`func(*args)` on a worker thread, once one of the slots is free."""
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter())

    def busy(self) -> int:
        """Slots in use on the current event loop."""
        return int(self._limiter().borrowed_tokens)
