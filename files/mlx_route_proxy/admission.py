"""Admission control: at most `limit` generations at once, at most `queue` waiting."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import deque

UNCANCEL = sys.version_info >= (3, 11)  # Task.cancelling()/uncancel()


class QueueFull(Exception):
    pass


class Gate:
    """At most `limit` holders, at most `queue` waiters; first come, first served."""

    def __init__(self, limit: int, queue: int):
        self.limit, self.queue = limit, queue
        self.active = 0
        self.waiters: deque[asyncio.Future] = deque()

    def try_acquire(self) -> bool:
        """A slot at once if one is free and nobody waits (no coroutine: the usual case)."""
        if self.active < self.limit and not self.waiters:
            self.active += 1
            return True
        return False

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


class Ticker:
    """Many deadlines on one loop timer, set for the earliest of them.

    A request has up to three (its deadline, the upstream's first byte, the
    grace for the upstream's end of message) and almost always ends before
    any: with a loop timer each that is ~10 us of timer setup and teardown a
    request; here it is a dict insertion and removal. The one timer is moved
    only when a deadline comes in earlier than it; removing a deadline leaves
    it alone (it fires, finds nothing due, and sets itself for the next).
    Callbacks run on time, as a loop timer's would.
    """

    def __init__(self):
        self.pending: dict = {}  # callback -> loop time it is due
        self.handle: asyncio.TimerHandle | None = None
        self.when = 0.0  # when the handle fires
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, callback, when: float) -> None:
        """callback() at loop time `when` unless removed before (one per callback)."""
        self.pending[callback] = when
        if self.handle is None or when < self.when:
            if self.handle is not None:
                self.handle.cancel()
            if self.loop is None:
                self.loop = asyncio.get_running_loop()
            self.when = when
            self.handle = self.loop.call_at(when, self.run)

    def remove(self, callback) -> None:
        self.pending.pop(callback, None)

    def run(self) -> None:
        self.handle = None
        pending = self.pending
        if not pending:
            return
        now = self.loop.time()
        due = [callback for callback, when in pending.items() if when <= now]
        for callback in due:
            if pending.pop(callback, None) is None:
                continue  # removed by an earlier callback
            try:
                callback()
            except Exception as e:  # as the loop does with a failing timer callback
                self.loop.call_exception_handler({"message": "deadline callback failed",
                                                  "exception": e})
        if pending:
            self.when = min(pending.values())
            self.handle = self.loop.call_at(self.when, self.run)


class Deadline:
    """`with Deadline(ticker, when)` in a task: asyncio.timeout at loop time `when`, on
    a Ticker (the same cancellation, and asyncio.TimeoutError; below Python 3.11,
    without Task.uncancel, a cancel from outside that meets the deadline is
    taken for the deadline, as async_timeout does). A plain context manager: the
    cancellation comes at an await inside the block all the same, and entering
    and leaving cost no coroutine."""

    __slots__ = ("ticker", "when", "task", "cancelling", "expired")

    def __init__(self, ticker: Ticker, when: float):
        self.ticker, self.when, self.expired = ticker, when, False

    def __enter__(self) -> Deadline:
        ticker = self.ticker
        if ticker.loop is None:
            ticker.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task(ticker.loop)
        self.cancelling = self.task.cancelling() if UNCANCEL else 0
        self.ticker.add(self.expire, self.when)
        return self

    def expire(self) -> None:
        self.expired = True
        self.task.cancel()

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.expired:
            self.ticker.remove(self.expire)
        elif ((self.task.uncancel() if UNCANCEL else 0) <= self.cancelling
              and exc_type is asyncio.CancelledError):
            raise asyncio.TimeoutError from exc  # the cancellation was ours
