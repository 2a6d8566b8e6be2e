"""A first-come first-served semaphore that coroutines of any event loop await without holding a thread.

The pose service is shared by REST (uvicorn's loop) and gRPC (its own loop in another thread), so
an ``asyncio.Semaphore`` (bound to one loop) cannot guard what both use, and a thread semaphore
would park executor threads that the slot holders themselves need to finish (a deadlock once
every executor thread waits). :class:`SharedSlots` keeps its count under a thread lock and wakes
a waiter on that waiter's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    granted: bool = False  # a slot was handed to it (set under the lock, before its loop hears of it)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class SharedSlots:
    """``limit`` slots, handed out in the order they were asked for."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._free = limit
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()

    @property
    def in_use(self) -> int:
        return self.limit - self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, timeout_s: float) -> bool:
        """Take a slot, waiting at most ``timeout_s``; False if none came in time."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            waiter = _Waiter(loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), max(timeout_s, 0.0))
            return True
        except BaseException as exc:  # timed out or cancelled: leave the line, or hand back what came
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self._waiters.remove(waiter)
            if granted:
                self.release()
            if isinstance(exc, TimeoutError):
                return False
            raise

    def release(self) -> None:
        """Give a slot back: to the first waiter still waiting, else to the pool."""
        while True:
            with self._lock:
                if not self._waiters:
                    self._free += 1
                    return
                waiter = self._waiters.popleft()
                waiter.granted = True
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.future)
                return
            except RuntimeError:  # its loop is closed: nobody will take the slot there, try the next
                continue

    @contextlib.asynccontextmanager
    async def slot(self, timeout_s: float) -> AsyncIterator[None]:
        """Hold a slot for the block; TimeoutError if none came within ``timeout_s``."""
        if not await self.acquire(timeout_s):
            raise TimeoutError(f"no slot free within {timeout_s:.1f} s ({self.limit} in use)")
        try:
            yield
        finally:
            self.release()
