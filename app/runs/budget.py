"""Each application's budget of run data in Redis (`resume_redis_budget_bytes`, F3): what a run
is assumed to cost Redis, and what this replica's runs cost that is not counted there yet.

The counters themselves live in Redis (`app.runs.store.RedisRunStore.budget_used` /
`budget_add`): a run's cost is added when its end is recorded. Until then it is only known
here, so a new run's check adds this replica's `UncountedCosts` of its application: a client
that starts its next run as soon as the last one's answer has arrived (before its end is
recorded), or many runs at once, is not missed. A run counts from the moment it starts (its
keys), its events as they arrive.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from app.runs.log import RunLog
from app.runs.store import RedisRunStore
from app.sessions.backend import StoreUnavailable

log = logging.getLogger(__name__)

# Redis's memory for a run beyond its framed bytes (measured on Redis 7.0, `MEMORY USAGE` and
# `used_memory`, by two outside attacks): the allocator's size classes (up to a quarter more: a
# 512 KiB entry takes a 640 KiB allocation); per stream entry ~17-24 bytes, but an entry of
# ~2 KiB sits alone in a stream node shrunk to a 2560-byte allocation plus ~260 bytes of index
# (2031 framed bytes held 2831: a third more, plus 160 per entry, covers it with ~2 % to spare);
# per run its keys and the stream's first node (~4.7-5.0 KiB, even for a run without events).
_ALLOCATOR_SLACK_DIVISOR = 3
ENTRY_OVERHEAD_BYTES = 160
RUN_OVERHEAD_BYTES = 6 * 1024


def redis_cost(framed_bytes: int, entries: int, *, runs: int = 1) -> int:
    """The memory (bytes) Redis is assumed to need for `runs` runs holding `framed_bytes`
    framed bytes in at most `entries` stream entries: what the application's budget counts."""
    return (
        framed_bytes
        + framed_bytes // _ALLOCATOR_SLACK_DIVISOR
        + entries * ENTRY_OVERHEAD_BYTES
        + runs * RUN_OVERHEAD_BYTES
    )


def run_cost(log: RunLog, entry_bytes: int) -> int:
    """What one run with `log` costs Redis: the events its log holds (at most one entry each)
    plus, once the log has dropped its oldest events, one more entry of `entry_bytes`: the
    stream's oldest entry may still hold events the log no longer has (trimming keeps an entry
    while its last event is kept)."""
    events = log.next_seq - log.first_seq
    if log.first_seq > 1:
        return redis_cost(log.bytes + entry_bytes, events + 1)
    return redis_cost(log.bytes, events)


class UncountedCosts:
    """Per application: what its runs in this process cost Redis that its Redis counter does
    not count yet. Each run reports changes of its cost (`add`) and takes it back when its end
    is counted (or will never be)."""

    __slots__ = ("_by_app",)

    def __init__(self) -> None:
        self._by_app: dict[str, int] = {}

    def get(self, app_id: str) -> int:
        return self._by_app.get(app_id, 0)

    def add(self, app_id: str, delta: int) -> None:
        """Add `delta` (negative: remove) to `app_id`'s uncounted cost."""
        left = self._by_app.get(app_id, 0) + delta
        if left > 0:
            self._by_app[app_id] = left
        else:
            self._by_app.pop(app_id, None)


@dataclass(slots=True)
class _Read:
    """Redis's counters of one application as last read: their sum, and when the read was
    sent (loop time)."""

    used: int
    sent_at: float


@dataclass(slots=True)
class _Cost:
    """An ended run's cost on its way to its application's counter in Redis."""

    cost: int
    window_ms: int
    until: float  # loop time its run's keys expire: counting it after that is pointless


# An application whose runs hold this share of its budget or more is near it: every check
# reads Redis and every ended run is counted there at once (attack-gate-8: with cached reads
# and batched counts throughout, two replicas each filled the whole budget, 1.93-2.01x).
NEAR_BUDGET_SHARE = 0.25


class BudgetLedger:
    """Each application's counter of run bytes in Redis, as this replica knows it. Far from
    its budget (under `NEAR_BUDGET_SHARE` of it), the counter is read at most every `refresh`
    seconds and this replica's ended runs are added every `refresh` seconds (one atomic
    `INCRBY`+`PEXPIRE` per application), so a run costs Redis no budget round trip; near it,
    every check reads the counter and every ended run is added at once (what each run did
    before this ledger).

    `used` is exact for this replica's own ended runs (a cost counts here from the moment its
    run's end is recorded until a read sent after Redis counted it has returned). Far from the
    budget it misses what other replicas counted since the last read and what they have not
    sent yet; each of them stops batching at `NEAR_BUDGET_SHARE` of the budget by its own
    count, so an application's runs exceed their budget by about that share per other replica
    at most (plus, as always, its runs in flight). A cost whose `INCRBY` failed is sent again
    with the next flush, until its run's keys expired."""

    def __init__(self, *, refresh: float) -> None:
        self._refresh = refresh
        self._reads: dict[str, _Read] = {}
        self._reading: dict[str, asyncio.Task[None]] = {}
        self._unsent: dict[str, list[_Cost]] = {}
        # Costs Redis counted (loop time it answered, cost), until a read sent after that.
        self._sent: dict[str, list[tuple[float, int]]] = {}
        self._near: set[str] = set()  # applications near their budget (see the docstring)
        self._store: RedisRunStore | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._flush_again = False

    async def used(
        self, store: RedisRunStore, app_id: str, *, window_ms: int, budget: int, extra: int = 0
    ) -> int:
        """The bytes `app_id`'s ended runs hold in Redis as far as this replica knows (see
        the class docstring). `extra`: what the caller adds to it (its runs not ended yet),
        counted for the nearness to `budget`. Reads Redis when the last read is `refresh`
        seconds old, or when near the budget (one read at a time per application: concurrent
        callers share it). Raises `StoreUnavailable` when that read fails."""
        loop = asyncio.get_running_loop()
        read = self._reads.get(app_id)
        near = budget * NEAR_BUDGET_SHARE
        if (
            read is None
            or loop.time() - read.sent_at >= self._refresh
            or self._known(app_id, read) + extra >= near
        ):
            task = self._reading.get(app_id)
            if task is None:
                task = loop.create_task(self._read(store, app_id, window_ms))
                self._reading[app_id] = task
            await asyncio.shield(task)
            read = self._reads[app_id]
        used = self._known(app_id, read)
        if used + extra >= near:
            self._near.add(app_id)
        else:
            self._near.discard(app_id)
        return used

    def _known(self, app_id: str, read: _Read) -> int:
        unsent = sum(item.cost for item in self._unsent.get(app_id, ()))
        sent = sum(cost for _, cost in self._sent.get(app_id, ()))
        return read.used + unsent + sent

    async def _read(self, store: RedisRunStore, app_id: str, window_ms: int) -> None:
        sent_at = asyncio.get_running_loop().time()
        try:
            used = await store.budget_used(app_id, window_ms=window_ms)
        finally:
            del self._reading[app_id]
        self._reads[app_id] = _Read(used, sent_at)
        sent = self._sent.get(app_id)
        if sent:  # what Redis had counted when this read was sent is in `used` now
            self._sent[app_id] = [item for item in sent if item[0] >= sent_at]

    def add(
        self, store: RedisRunStore, app_id: str, cost: int, *, window_ms: int, keep: float
    ) -> None:
        """Count an ended run of `app_id` that costs Redis `cost` bytes for `window_ms`; its
        keys expire within `keep` seconds. Sent to Redis with the next flush: at once when
        the application is near its budget."""
        loop = asyncio.get_running_loop()
        self._store = store
        item = _Cost(cost, window_ms, loop.time() + keep)
        self._unsent.setdefault(app_id, []).append(item)
        self._schedule(soon=app_id in self._near)

    def _schedule(self, *, soon: bool) -> None:
        if self._flushing is not None:
            self._flush_again = self._flush_again or soon
            return
        loop = asyncio.get_running_loop()
        if soon:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            self._flush_handle = loop.call_soon(self._start_flush)
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(self._refresh, self._start_flush)

    def _start_flush(self) -> None:
        self._flush_handle = None
        self._flushing = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        """Send every unsent cost (one `budget_add` per application and window); those that
        failed stay for the next flush (scheduled again while any is left)."""
        store, loop = self._store, asyncio.get_running_loop()
        try:
            if store is not None:
                batches = [
                    (app_id, window_ms, items)
                    for app_id, costs in self._unsent.items()
                    for window_ms, items in _by_window(costs).items()
                ]
                await asyncio.gather(
                    *(self._send(store, app_id, ms, items) for app_id, ms, items in batches)
                )
        finally:
            self._flushing = None
            now = loop.time()
            for app_id in list(self._unsent):
                left = [item for item in self._unsent[app_id] if item.until > now]
                if left:
                    self._unsent[app_id] = left
                else:
                    del self._unsent[app_id]
            again, self._flush_again = self._flush_again, False
            if self._unsent:
                self._schedule(soon=again)

    async def _send(
        self, store: RedisRunStore, app_id: str, window_ms: int, items: list[_Cost]
    ) -> None:
        try:
            await store.budget_add(app_id, sum(i.cost for i in items), window_ms=window_ms)
        except StoreUnavailable as err:
            log.warning("app %s: its runs' bytes could not be counted yet (%s)", app_id, err)
            return
        done = asyncio.get_running_loop().time()
        unsent = self._unsent.get(app_id, [])
        sent_ids = {id(item) for item in items}
        self._unsent[app_id] = [item for item in unsent if id(item) not in sent_ids]
        self._sent.setdefault(app_id, []).append((done, sum(i.cost for i in items)))

    async def close(self) -> None:
        """Shutdown: send what is left once (best effort: failures are logged)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        if self._unsent:
            await self.flush()
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None


def _by_window(costs: list[_Cost]) -> dict[int, list[_Cost]]:
    grouped: dict[int, list[_Cost]] = {}
    for item in costs:
        grouped.setdefault(item.window_ms, []).append(item)
    return grouped
