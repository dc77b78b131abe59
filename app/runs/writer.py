"""A run's events on their way to Redis: group commits, one `XADD` in flight at a time
(app/runs/runs.py's module docstring)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from operator import itemgetter
from typing import TYPE_CHECKING

from app.runs.entries import kept_of
from app.runs.store import RedisRunStore
from app.sessions.backend import StoreUnavailable

if TYPE_CHECKING:
    from app.runs.run import Run

log = logging.getLogger(__name__)


class RunWriter:
    """A run's events on their way to Redis: one `XADD` in flight at a time, carrying every
    event that arrived while the previous one was (see the module docstring). `failed` holds
    the store's error once a write failed (nothing more is written then)."""

    def __init__(self, store: RedisRunStore, run: Run, *, ttl_ms: int) -> None:
        self.store = store
        self._store = store
        self._run = run
        # The stream's TTL, set with every write (any may create the stream: the first, or one
        # after a Redis restart): a run that fails before its next heartbeat leaves no key
        # without a TTL.
        self._ttl_ms = ttl_ms
        # The run's creation made its stream (with its TTL): each write is one
        # `XADD NOMKSTREAM`, not `XADD` + `PEXPIRE` (RedisRunStore.append; a stream gone
        # meanwhile is written again with its TTL).
        self._pending: list[tuple[int, bytes]] = []
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._written = asyncio.Event()
        self._closing = False
        self.failed: StoreUnavailable | None = None
        # The last event written to Redis; how many were, and their framed bytes.
        self.written_seq = 0
        self.written_events = 0
        self.written_bytes = 0
        # Started one loop turn after the first `add` (`_start`): a run whose events and end
        # arrive together (one burst) writes them with its end and never needs the task.
        self._task: asyncio.Task[None] | None = None
        self._starting = False

    @property
    def backlog(self) -> int:
        return len(self._pending)

    @property
    def backlog_bytes(self) -> int:
        return self._pending_bytes

    def add(
        self, entries: list[tuple[int, bytes]], first_kept: int = 0, size: int | None = None
    ) -> None:
        """Queue `entries` (framed events by sequence number; `size` their bytes, when the
        caller knows it) for the next write; those before `first_kept`, which the run's log
        has dropped, leave the queue (Redis would trim them at once, and held here they are
        copies the log no longer bounds)."""
        pending = self._pending
        pending.extend(entries)
        self._pending_bytes += _size(entries) if size is None else size
        if pending and pending[0][0] < first_kept:
            kept = kept_of(pending, first_kept)
            self._pending = list(kept)
            self._pending_bytes = _size(kept)
        if self._task is not None:
            self._wake.set()
        elif not self._starting:
            self._starting = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        if self._closing or self._task is not None:
            return
        self._wake.set()
        self._task = asyncio.create_task(self._loop())

    async def drained(self) -> None:
        """Wait until the backlog was written (or a write failed)."""
        while (
            self._pending
            and self.failed is None
            and not (self._task is not None and self._task.done())
        ):
            self._written.clear()
            await self._written.wait()

    async def finish(self) -> list[tuple[int, bytes]]:
        """Stop after the write in flight; returns what is still unwritten (it goes out with
        the run's end, in one entry)."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            await asyncio.gather(self._task, return_exceptions=True)
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        return pending

    async def _loop(self) -> None:
        run = self._run
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._pending and not self._closing:
                    batch, self._pending = self._pending, []
                    self._pending_bytes = 0
                    run.entry_bucket = await self._store.append(
                        run.run_id,
                        batch,
                        run.log.first_seq,
                        expire_ms=self._ttl_ms,
                        exists=True,
                        largest=run.entry_bucket,
                    )
                    self.written_seq = batch[-1][0]
                    self.written_events += len(batch)
                    self.written_bytes += _size(batch)
                    self._written.set()
                if self._closing:
                    return
        except StoreUnavailable as err:
            log.warning("run %s: the run store failed (%s)", run.run_id, err)
            self.failed = err
            self._written.set()
            run.wake()


def _size(entries: Sequence[tuple[int, bytes]]) -> int:
    return sum(map(len, map(itemgetter(1), entries)))
