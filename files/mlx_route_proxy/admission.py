"""Admission control: at most `limit` generations at once, at most `queue` waiting."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class QueueFull(Exception):
    pass


class Gate:
    """At most `limit` holders, at most `queue` waiters; first come, first served."""

    def __init__(self, limit: int, queue: int):
        self.limit, self.queue = limit, queue
        self.active = 0
        self.waiters: deque[asyncio.Future] = deque()

    async def acquire(self) -> None:
        if self.active < self.limit and not self.waiters:
            self.active += 1
            return
        if len(self.waiters) >= self.queue:
            raise QueueFull
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            else:
                # release() may already have dropped our cancelled future (many
                # waiters cancelled at once, then a slot freed before they ran).
                with contextlib.suppress(ValueError):
                    self.waiters.remove(fut)
            raise

    def release(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes on; active stays the same
                return
        self.active -= 1
