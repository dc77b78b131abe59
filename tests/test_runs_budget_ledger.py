"""The budget ledger (app/runs/budget.py `BudgetLedger`): an application's run bytes in Redis
read at most every `RUN_BUDGET_REFRESH_SECONDS` and this replica's ended runs added together,
without ever under-counting this replica's own runs; a failed add is sent again. Unit tests on
a scripted store, then the real script on redis-server (the round trips a run costs:
tests/test_runs_round_trips.py)."""

from __future__ import annotations

import asyncio
from typing import cast

from app.runs.budget import BudgetLedger
from app.runs.store import RedisRunStore
from app.sessions.backend import StoreUnavailable
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import RedisOptions, make_client
from tests.redis_server import RedisServer

WINDOW_MS = 60_000
FAR = 10**12  # a budget these tests never come near


class ScriptedStore:
    """A Redis counter per application; `failing` makes adds raise `StoreUnavailable`."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.reads = 0
        self.adds: list[tuple[str, int]] = []
        self.failing = False
        self.read_gate: asyncio.Event | None = None

    async def budget_used(self, app_id: str, *, window_ms: int) -> int:
        self.reads += 1
        value = self.counters.get(app_id, 0)  # what Redis answers; the reply may be slow
        if self.read_gate is not None:
            await self.read_gate.wait()
        return value

    async def budget_add(self, app_id: str, cost: int, *, window_ms: int) -> None:
        await asyncio.sleep(0)
        if self.failing:
            raise StoreUnavailable("ConnectionError: refused")
        self.adds.append((app_id, cost))
        self.counters[app_id] = self.counters.get(app_id, 0) + cost


def _ledger(refresh: float = 0.05) -> tuple[BudgetLedger, ScriptedStore, RedisRunStore]:
    scripted = ScriptedStore()
    return BudgetLedger(refresh=refresh), scripted, cast(RedisRunStore, scripted)


async def test_reads_redis_once_per_refresh_and_concurrent_checks_share_the_read() -> None:
    ledger, scripted, store = _ledger(refresh=0.2)
    scripted.counters["shop"] = 1000
    scripted.read_gate = asyncio.Event()
    checks = [
        asyncio.create_task(ledger.used(store, "shop", window_ms=WINDOW_MS, budget=FAR))
        for _ in range(20)
    ]
    await asyncio.sleep(0.01)
    scripted.read_gate.set()
    assert await asyncio.gather(*checks) == [1000] * 20
    assert scripted.reads == 1
    for _ in range(50):
        assert await ledger.used(store, "shop", window_ms=WINDOW_MS, budget=FAR) == 1000
    assert scripted.reads == 1
    scripted.counters["shop"] = 3000  # another replica counted runs
    await asyncio.sleep(0.21)
    assert await ledger.used(store, "shop", window_ms=WINDOW_MS, budget=FAR) == 3000
    assert scripted.reads == 2
    assert await ledger.used(store, "other", window_ms=WINDOW_MS, budget=FAR) == 0  # its own read
    assert scripted.reads == 3


async def test_own_ended_runs_count_at_once_and_reach_redis_together_never_twice() -> None:
    ledger, scripted, store = _ledger(refresh=0.1)
    assert await ledger.used(store, "shop", window_ms=WINDOW_MS, budget=FAR) == 0
    for cost in (100, 200, 300):
        ledger.add(store, "shop", cost, window_ms=WINDOW_MS, keep=60)
    # Not in Redis yet, counted here.
    assert scripted.adds == []
    assert await ledger.used(store, "shop", window_ms=WINDOW_MS, budget=FAR) == 600
    # A read sent before the flush (its reply without the 600) and answered after it.
    await asyncio.sleep(0.1)
    scripted.read_gate = asyncio.Event()
    check = asyncio.create_task(ledger.used(store, "shop", window_ms=WINDOW_MS, budget=FAR))
    await asyncio.sleep(0.05)  # the flush: one add for the three
    assert scripted.adds == [("shop", 600)]
    scripted.read_gate.set()
    assert await check == 600  # not 0: Redis counted it after that read was sent
    scripted.read_gate = None
    await asyncio.sleep(0.1)  # a read sent after the flush sees it in Redis
    assert await ledger.used(store, "shop", window_ms=WINDOW_MS, budget=FAR) == 600  # not 1200
    assert scripted.adds == [("shop", 600)]


async def test_a_failed_add_stays_counted_and_is_sent_again_until_its_keys_expired() -> None:
    ledger, scripted, store = _ledger(refresh=0.05)
    scripted.failing = True
    ledger.add(store, "shop", 500, window_ms=WINDOW_MS, keep=60)
    ledger.add(store, "shop", 70, window_ms=WINDOW_MS, keep=0.12)  # its keys expire soon
    await asyncio.sleep(0.08)
    assert scripted.adds == []
    assert await ledger.used(store, "shop", window_ms=WINDOW_MS, budget=FAR) == 570
    await asyncio.sleep(0.1)  # the short-lived cost is dropped with its keys
    assert await ledger.used(store, "shop", window_ms=WINDOW_MS, budget=FAR) == 500
    scripted.failing = False
    await asyncio.sleep(0.1)
    assert scripted.adds == [("shop", 500)]
    await asyncio.sleep(0.06)
    assert await ledger.used(store, "shop", window_ms=WINDOW_MS, budget=FAR) == 500


async def test_close_sends_what_is_left() -> None:
    ledger, scripted, store = _ledger(refresh=30)
    ledger.add(store, "shop", 123, window_ms=WINDOW_MS, keep=60)
    ledger.add(store, "other", 7, window_ms=WINDOW_MS, keep=60)
    await ledger.close()
    assert sorted(scripted.adds) == [("other", 7), ("shop", 123)]


async def test_the_counter_gets_its_ttl_in_the_same_script_on_redis(
    shared_redis: RedisServer,
) -> None:
    backend = RedisBackend(make_client(RedisOptions(url=shared_redis.url)))
    store = RedisRunStore(backend, backend, "t:")
    ledger = BudgetLedger(refresh=0.05)
    try:
        ledger.add(store, "shop", 4000, window_ms=WINDOW_MS, keep=60)
        ledger.add(store, "shop", 96, window_ms=WINDOW_MS, keep=60)
        await asyncio.sleep(0.15)
        client = shared_redis.client()
        (key,) = client.keys("t:runs:{shop}:bytes:*")
        assert int(client.get(key) or 0) == 4096
        assert 0 < client.pttl(key) <= 2 * WINDOW_MS
        assert await store.budget_used("shop", window_ms=WINDOW_MS) == 4096
        assert await ledger.used(store, "shop", window_ms=WINDOW_MS, budget=FAR) == 4096
    finally:
        await ledger.close()
        await backend.close()


async def test_near_its_budget_every_check_reads_redis_and_every_end_is_counted_at_once() -> None:
    """attack-gate-8: with cached reads and batched counts near the budget, two replicas each
    filled the whole budget (1.93-2.01x). Near it (a quarter), the ledger does what each run
    did before it."""
    ledger, scripted, store = _ledger(refresh=30)
    budget = 4000
    scripted.counters["shop"] = 500
    assert await ledger.used(store, "shop", window_ms=WINDOW_MS, budget=budget) == 500
    assert await ledger.used(store, "shop", window_ms=WINDOW_MS, budget=budget) == 500
    assert scripted.reads == 1  # far from it (under 1000): one read per refresh
    scripted.counters["shop"] = 900  # another replica counted runs
    # Its own running runs (extra) bring it near: this check reads Redis again.
    near = {"window_ms": WINDOW_MS, "budget": budget, "extra": 600}
    assert await ledger.used(store, "shop", **near) == 900
    assert scripted.reads == 2
    assert await ledger.used(store, "shop", **near) == 900
    assert scripted.reads == 3  # near: every check
    ledger.add(store, "shop", 300, window_ms=WINDOW_MS, keep=60)
    await asyncio.sleep(0.01)
    assert scripted.adds == [("shop", 300)]  # at once, not after the 30 s refresh
    assert await ledger.used(store, "shop", **near) == 1200  # counted once
    await ledger.close()


class StallingReserveStore(ScriptedStore):
    """Near its budget every check is a `budget_reserve`; each stalls `stall` seconds, then
    fails (a frozen Redis: the op timeout, retries spent)."""

    def __init__(self, stall: float) -> None:
        super().__init__()
        self.stall = stall
        self.reserves = 0

    async def budget_reserve(
        self,
        app_id: str,
        *,
        window_ms: int,
        uncounted: int,
        budget: int,
        publish: int,
        ttl_ms: int,
    ) -> tuple[bool, int]:
        self.reserves += 1
        await asyncio.sleep(self.stall)
        raise StoreUnavailable("TimeoutError: no reply")


async def test_checks_queued_behind_a_failed_flight_write_fail_with_it_not_one_by_one() -> None:
    """Near the budget, a replica's checks of one application take turns (their flight writes
    must reach Redis in order); when the one in flight fails (a frozen Redis), those waiting
    fail with it at once (the run relayed without resume), instead of each waiting for the
    timeouts of all before it: 10 checks cost one stall, not ten."""
    scripted = StallingReserveStore(stall=0.2)
    ledger, store = BudgetLedger(refresh=60.0), cast(RedisRunStore, scripted)
    scripted.counters["shop"] = 600  # of a budget of 1000: near it
    loop = asyncio.get_running_loop()
    began = loop.time()
    checks = [
        asyncio.create_task(ledger.admit(store, "shop", window_ms=WINDOW_MS, budget=1000))
        for _ in range(10)
    ]
    results = await asyncio.gather(*checks, return_exceptions=True)
    took = loop.time() - began
    assert all(isinstance(result, StoreUnavailable) for result in results), results
    assert scripted.reserves == 1, scripted.reserves
    assert took < 1.0, took  # one stall (0.2 s), where one by one would take 2 s
