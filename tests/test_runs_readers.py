"""The shared follower of a run pumped elsewhere (app/runs/readers.py), against a scripted
store: failing reads are retried within the retry window (its readers keep waiting, then get
the events), past it the readers learn `run_store_unavailable`; a vanished pumper heartbeat
with nothing more stored is `run_orphaned`."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from app.runs.entries import Entry
from app.runs.readers import Follower, FollowTiming
from app.runs.store import RedisRunStore
from app.sessions.backend import StoreUnavailable


class ScriptedStore:
    """`follow` answers from `script`: an exception is raised, a list returned; then empty."""

    def __init__(self, script: list[Any], *, alive: bool = True) -> None:
        self.script = script
        self.alive = alive
        self.follows = 0
        self.catchup_clients: list[str] = []

    async def follow(self, run_id: str, after: int, *, block_ms: int, count: int) -> list[Entry]:
        self.follows += 1
        await asyncio.sleep(0.001)
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, BaseException):
                raise step
            return cast(list[Entry], step)
        await asyncio.sleep(block_ms / 1000)
        return []

    async def reader_tick(self, run_id: str, *, window_ms: int) -> bool:
        return self.alive

    async def range_after(
        self, run_id: str, after: int, count: int, *, app_id: str, client: str
    ) -> list[Entry]:
        self.catchup_clients.append(client)
        return []


def _follower(store: ScriptedStore, retry_seconds: float) -> tuple[Follower, list[int]]:
    released: list[int] = []
    follower = Follower(
        cast(RedisRunStore, store),
        "run",
        0,
        app_id="shop",
        client="198.51.100.9",
        timing=FollowTiming(
            heartbeat=0.05, window_ms=1000, retry_seconds=retry_seconds, max_bytes=1 << 20
        ),
        release=lambda: released.append(1),
    )
    follower.readers = 1
    return follower, released


async def _until(condition: Any) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.01)


async def test_failed_reads_are_retried_within_the_window_and_the_events_arrive() -> None:
    down = StoreUnavailable("pool exhausted")
    events = [Entry(2, data=b"data: a\nid: 1\n\ndata: b\nid: 2\n\n", first=1)]
    store = ScriptedStore([down, down, down, events, [Entry(3, end="done", first=3)]])
    follower, released = _follower(store, retry_seconds=5.0)
    await _until(lambda: follower.done)
    assert follower.failure is None and follower.ended
    assert [entry.seq for entry in follower.after(0)] == [2, 3]
    assert released == [1]


async def test_reads_failing_past_the_window_end_with_run_store_unavailable() -> None:
    store = ScriptedStore([StoreUnavailable("down")] * 1000)
    follower, released = _follower(store, retry_seconds=0.2)
    await _until(lambda: follower.done)
    assert follower.failure == "run_store_unavailable"
    assert store.follows > 1  # retried before giving up
    assert released == [1]


async def test_a_gone_pumper_with_nothing_more_stored_is_run_orphaned() -> None:
    follower, released = _follower(ScriptedStore([], alive=False), retry_seconds=5.0)
    await _until(lambda: follower.done)
    assert follower.failure == "run_orphaned"
    assert released == [1]


async def test_the_follower_stops_when_its_last_reader_leaves() -> None:
    store = ScriptedStore([])
    follower, released = _follower(store, retry_seconds=5.0)
    await asyncio.sleep(0.1)
    follower.readers = 0
    await _until(lambda: follower.done)
    assert follower.failure is None and not follower.ended
    assert released == [1]


async def test_the_followers_catchup_reads_take_its_readers_turns_in_the_gate() -> None:
    """attack-10: a replica's followers of an application sharing one turn let one client's
    followers and replays take 9 slots per slot of another user's follower."""
    store = ScriptedStore([])
    follower, _ = _follower(store, retry_seconds=5.0)
    await _until(lambda: store.follows > 0)  # caught up: from its catch-up read to XREAD
    follower.readers = 0
    await _until(lambda: follower.done)
    assert store.catchup_clients and set(store.catchup_clients) == {"198.51.100.9"}
