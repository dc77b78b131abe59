"""The catch-up gate: at most `slots` catch-up reads of run events (`XRANGE`) in flight per
process, each a reply Redis buffers against `maxmemory` (app/runs/store.py `range_after`).

Granted fairly between applications (attack-replay-7): each application's waiters queue in
order, and a freed slot goes to the application that has waited longest for its turn (round
robin), so one application's replays (64 readers of 4 MiB runs) delay another's read by about
one read in flight, not by its whole queue (they made a replay of 12 entries ~300 times
slower, and a live follower lose its run). A waiter gives up with the operation's deadline
(`wait` seconds, the caller's `REDIS_OP_TIMEOUT_SECONDS`): when Redis stalls, every reader
learns it within about one deadline, not one deadline per `slots` readers queued before it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

from app.sessions.backend import StoreUnavailable


class CatchupGate:
    """`slots` permits, granted round robin between applications (see the module docstring)."""

    __slots__ = ("_free", "_waiting")

    def __init__(self, slots: int) -> None:
        self._free = slots
        # Per application, its waiters in order; the application first here is served next.
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    @contextlib.asynccontextmanager
    async def slot(self, app_id: str, *, wait: float) -> AsyncIterator[None]:
        """Hold one permit inside; waits at most `wait` seconds for it, then raises
        `StoreUnavailable` (the caller's deadline: a stalled Redis frees no slot)."""
        await self._acquire(app_id, wait)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, app_id: str, wait: float) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(app_id, deque()).append(granted)
        try:
            async with asyncio.timeout(wait):
                await granted
        except BaseException as err:
            if granted.done() and not granted.cancelled():
                self._release()  # granted just as the wait ended: hand the slot on
            else:
                self._forget(app_id, granted)
            if isinstance(err, TimeoutError):
                raise StoreUnavailable(
                    f"catch-up reads of run events busy for {wait:g} s (RUN_CATCHUP_READS)"
                ) from err
            raise

    def _forget(self, app_id: str, granted: asyncio.Future[None]) -> None:
        queue = self._waiting.get(app_id)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(granted)
        if not queue:
            del self._waiting[app_id]

    def _release(self) -> None:
        while self._waiting:
            app_id, queue = self._waiting.popitem(last=False)
            granted = queue.popleft()
            if queue:
                self._waiting[app_id] = queue  # its next waiter: after the other applications
            if not granted.done():
                granted.set_result(None)
                return
        self._free += 1
