"""Resume readers: their caps, and one shared Redis follower per run and replica.

A resume stream (`GET /apps/{id}/runs/{runId}`) costs no upstream connection, so it takes no
slot of app/capacity.py; what it may exhaust is this replica's, counted here per replica:

- **Readers** (`ReaderCaps.enter`, before the response starts): at most `RUN_READERS_PER_RUN`
  open resume streams of one run, and at most the application's `max_concurrent_per_client`
  (0: none) open resume streams of one client address (`app.capacity.client_key`) in one
  application. These counts are their own: readers never take an agent request's slot, and
  agent requests never take a reader's.
- **Follow connections** (the blocking `XREAD`s, `RUN_FOLLOW_CONNECTIONS`): a run pumped by
  another replica is followed by ONE `Follower` on this replica, whatever the number of its
  readers here (they read the follower's in-process copy: a pool connection per run, not per
  reader). Each resumable application gets an equal share of the connections
  (`follow_share`: `RUN_FOLLOW_CONNECTIONS` // resumable applications, at least 1; the pool is
  sized to the sum of the shares), so one application's followers can never hold another's.
  One client address creates at most `RUN_FOLLOWS_PER_CLIENT` followers in an application (and
  never more than the share).

A request over any of them: 503 `upstream_busy` with `Retry-After: 1`, at once (before the
response starts, before anything blocks), counted in `agent_bff_run_resumes_refused_total
{application,limit}` (`run`, `client`, `follow`, `follow_client`).

A follower reads with `XREAD BLOCK` (a heartbeat at most), keeps the entries it read (the
last `MIRROR_ENTRIES` of them, at most the application's `resume_max_bytes`) and wakes its
readers; every heartbeat it refreshes the run's readers key once for all of them and checks
the pumper's heartbeat (`run_orphaned` when it is gone and no end was written). A read that
fails is retried (the readers get keep-alives) for up to twice `REDIS_OP_TIMEOUT_SECONDS` of
consecutive failures; then `run_store_unavailable`. A reader whose position is older than the
copy (a resume from further back) replays from Redis with `XRANGE` on the session client
(non-blocking) until it reaches the copy. The follower ends when its last reader has left
(after its read in flight, at most a heartbeat), when the run's end arrives, or on a failure;
its connection share is returned then.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from app.applications import AppConfig
from app.counts import decrement, increment
from app.errors import ApiError
from app.runs.entries import Entry, next_catchup_count
from app.runs.store import RedisRunStore
from app.runs.wakeup import Wakeup
from app.sessions.backend import StoreUnavailable

log = logging.getLogger(__name__)

READER_LIMITS = ("run", "client", "follow", "follow_client")
# Entries a follower keeps for its readers; a reader further back replays from Redis.
MIRROR_ENTRIES = 1024
# Entries per `XREAD`.
READ_COUNT = 512
# Pause between retries of a failed follower read.
_RETRY_PAUSE_SECONDS = 0.1

_MESSAGES = {
    "run": "This run has as many readers as it may have open; retry when one has ended.",
    "client": "Too many resume streams are open from this address; retry when one has ended.",
    "follow": "This application follows as many runs from other instances as it may; "
    "retry shortly.",
    "follow_client": "This address follows as many runs from other instances as it may; "
    "retry when one has ended.",
}


class ReadersBusy(ApiError):
    """503 `upstream_busy`: the reader limit `limit` (one of `READER_LIMITS`) is full."""

    def __init__(self, limit: str) -> None:
        super().__init__(503, "upstream_busy", _MESSAGES[limit], headers={"Retry-After": "1"})
        self.limit = limit


@dataclass(slots=True)
class AppReaders:
    """One application's open readers and followers on this replica."""

    per_client: int
    follows_per_client: int
    follow_limit: int
    runs: dict[str, int] = field(default_factory=dict)
    clients: dict[str, int] = field(default_factory=dict)
    follows: int = 0
    follow_clients: dict[str, int] = field(default_factory=dict)
    followers: dict[str, Follower] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(READER_LIMITS, 0))


class ReaderCaps:
    """The reader and follower caps of every resumable application (module docstring)."""

    def __init__(
        self,
        apps: Mapping[str, AppConfig],
        *,
        follow_connections: int,
        follows_per_client: int,
        readers_per_run: int,
    ) -> None:
        resumable = [app for app in apps.values() if app.resumable]
        self.follow_share = max(1, follow_connections // max(1, len(resumable)))
        # The pool never runs out before every application has used its share.
        self.pool_size = max(follow_connections, self.follow_share * len(resumable))
        self.readers_per_run = readers_per_run
        self.apps = {
            app.app_id: AppReaders(
                per_client=app.max_concurrent_per_client,
                follows_per_client=min(follows_per_client, self.follow_share),
                follow_limit=self.follow_share,
            )
            for app in resumable
        }

    def enter(self, app_id: str, run_id: str, client: str) -> None:
        """Count one more reader of `run_id` from `client`; `ReadersBusy` (nothing counted)
        when the run or the client has all it may have open."""
        slots = self.apps[app_id]
        if slots.runs.get(run_id, 0) >= self.readers_per_run:
            raise _refuse(slots, "run")
        if slots.per_client and slots.clients.get(client, 0) >= slots.per_client:
            raise _refuse(slots, "client")
        increment(slots.runs, run_id)
        increment(slots.clients, client)

    def leave(self, app_id: str, run_id: str, client: str) -> None:
        slots = self.apps[app_id]
        decrement(slots.runs, run_id)
        decrement(slots.clients, client)

    def follower(
        self,
        app_id: str,
        run_id: str,
        client: str,
        start: Callable[[Callable[[], None]], Follower],
    ) -> Follower:
        """The run's follower here: the live one, or a new one (`start(release)`, charged to
        `client`'s and the application's follow counts until it calls `release`);
        `ReadersBusy` when a new one is over a follow limit."""
        slots = self.apps[app_id]
        current = slots.followers.get(run_id)
        if current is not None and not current.done:
            return current
        if slots.follows >= slots.follow_limit:
            raise _refuse(slots, "follow")
        if slots.follow_clients.get(client, 0) >= slots.follows_per_client:
            raise _refuse(slots, "follow_client")
        slots.follows += 1
        increment(slots.follow_clients, client)
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            slots.follows -= 1
            decrement(slots.follow_clients, client)
            if slots.followers.get(run_id) is follower:
                del slots.followers[run_id]

        follower = start(release)
        slots.followers[run_id] = follower
        return follower


def _refuse(slots: AppReaders, limit: str) -> ReadersBusy:
    slots.refused[limit] += 1
    return ReadersBusy(limit)


@dataclass(frozen=True, slots=True)
class FollowTiming:
    """How a follower reads: `XREAD BLOCK` up to `heartbeat` seconds (and the pumper's
    heartbeat checked as often), the readers' presence key set for `window_ms`, failed reads
    retried for `retry_seconds`, at most `max_bytes` of events kept."""

    heartbeat: float
    window_ms: int
    retry_seconds: float
    max_bytes: int


class Follower:
    """The one blocking reader of a run pumped elsewhere, for every local reader of it (see
    the module docstring). `base`: the entries kept cover the sequence numbers after it;
    `pos`: the last sequence number read; `failure`: `run_orphaned` or `run_store_unavailable`
    once it gave up; `ended`: the run's end was read; `done`: it reads no more. It keeps at
    most `MIRROR_ENTRIES` entries and `max_bytes` of events (the application's
    `resume_max_bytes`). Its catch-up reads take the gate's turns (app/runs/catchup.py) of
    `client`, the address of the reader that made it: a run's readers are one session's (a
    replica's followers of an application sharing one turn let one client's followers and
    replays take 9 slots per slot of another user's follower: attack-10)."""

    def __init__(
        self,
        store: RedisRunStore,
        run_id: str,
        after: int,
        *,
        app_id: str,
        client: str,
        timing: FollowTiming,
        release: Callable[[], None],
    ) -> None:
        self.run_id = run_id
        self.app_id = app_id
        self.client = client
        self.base = after
        self.pos = after
        self.readers = 0
        self.failure: str | None = None
        self.ended = False
        self.done = False
        self.bytes = 0
        self._store = store
        self._entries: deque[Entry] = deque()
        self._wakeup = Wakeup()
        self._timing = timing
        self._release = release
        # Catching up (`_read`): from `after` through gated reads of `_count` entries.
        self._behind = True
        self._count = 1
        self._task = asyncio.create_task(self._loop())

    def after(self, pos: int) -> list[Entry]:
        """The kept entries holding sequence numbers after `pos` (`pos >= base`)."""
        out: list[Entry] = []
        for entry in reversed(self._entries):
            if entry.seq <= pos:
                break
            out.append(entry)
        out.reverse()
        return out

    async def wait(self, seconds: float) -> bool:
        """Wait up to `seconds` for new entries, the end or a failure; False on timeout."""
        return await self._wakeup.wait(seconds)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def _add(self, entries: list[Entry]) -> None:
        for entry in entries:
            if entry.seq <= self.pos and entry.data is not None:
                continue
            self._entries.append(entry)
            self.pos = max(self.pos, entry.seq)
            self.bytes += len(entry.data or b"")
            if entry.end is not None:
                self.ended = True
        # The last entry stays: it is one `ENTRY_BYTES` group of events (each within
        # `max_bytes`, the pump's parser ends a run before), or the end.
        while len(self._entries) > 1 and (
            len(self._entries) > MIRROR_ENTRIES or self.bytes > self._timing.max_bytes
        ):
            dropped = self._entries.popleft()
            self.base = dropped.seq
            self.bytes -= len(dropped.data or b"")
        self._wakeup.wake()

    async def _read(self, block_ms: int) -> list[Entry]:
        """The next entries: while behind (at the start, from its first reader's position, or
        after a large batch), catch-up reads through the store's gate (`range_after`, a few
        entries at a time); caught up, `XREAD BLOCK` for what comes next (F4: what Redis
        buffers for this follower is what the pump wrote since its last read, not the run)."""
        store = self._store
        if self._behind:
            entries = await store.range_after(
                self.run_id, self.pos, self._count, app_id=self.app_id, client=self.client
            )
            if entries:
                self._count = next_catchup_count(self._count, entries, READ_COUNT)
                return entries
            self._behind = False
        entries = await store.follow(self.run_id, self.pos, block_ms=block_ms, count=READ_COUNT)
        if next_catchup_count(READ_COUNT, entries, READ_COUNT) == 1:
            self._behind, self._count = True, 1
        return entries

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        store = self._store
        block_ms = max(1, round(self._timing.heartbeat * 1000))
        last_tick = loop.time()
        failing_since: float | None = None
        try:
            while self.readers > 0 and not self.ended:
                try:
                    entries = await self._read(block_ms)
                    now = loop.time()
                    if not entries or now - last_tick >= self._timing.heartbeat:
                        last_tick = now
                        alive = await store.reader_tick(
                            self.run_id, window_ms=self._timing.window_ms
                        )
                        if not entries and not alive:
                            # The end may have been written just before the heartbeat expired.
                            entries = await store.range_after(
                                self.run_id, self.pos, 1, app_id=self.app_id, client=self.client
                            )
                            if not entries:
                                self.failure = "run_orphaned"
                                return
                    failing_since = None
                except StoreUnavailable as err:
                    now = loop.time()
                    if failing_since is None:
                        failing_since = now
                        log.warning("run %s: following failed (%s); retrying", self.run_id, err)
                    if now - failing_since >= self._timing.retry_seconds:
                        self.failure = "run_store_unavailable"
                        return
                    await asyncio.sleep(_RETRY_PAUSE_SECONDS)
                    continue
                if entries:
                    self._add(entries)
        except Exception:
            log.exception("run %s: following failed", self.run_id)
            self.failure = "run_store_unavailable"
        finally:
            self.done = True
            self._release()
            self._wakeup.wake()
