"""Runs in flight near an application's budget (app/runs/budget.py `BudgetLedger.admit`,
`may_write`, `reserve_growth`, `note`; app/runs/store.py `budget_reserve`,
`budget_publish`; app/runs/scripts.py `BUDGET_READ`): each replica publishes what its runs
hold uncounted, checks on other replicas see it, a dead replica's runs count as ended, and a
new run counts from its start as much as its application's runs usually cost (attack-gate-9:
3 replicas x 4 clients kept 1.84-2.18x of the budget; tests/test_runs_budget_attacks6.py).
Two stores on one redis-server play two replicas."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestServer

from app.keys import RUNS_KEY
from app.runs.budget import FLIGHT_HEADROOM_BYTES, BudgetLedger
from app.runs.costs import UncountedCosts
from tests.fake_upstream import app_settings, run_gateway
from tests.redis_server import RedisServer
from tests.runs_helpers import CSRF, OneBigEventUpstream, read_events, run_stores

WINDOW_MS = 60_000
FLIGHT_KEY = "t:runs:{shop}:flight"


class HeldBigEvent(OneBigEventUpstream):
    """One event of `size` bytes, written once `hold` (when set) is set."""

    hold: asyncio.Event | None = None

    async def write_events(self, response: web.StreamResponse) -> None:
        if self.hold is not None:
            await self.hold.wait()
        await super().write_events(response)


async def test_a_replica_sees_the_others_runs_in_flight_not_its_own(
    shared_redis: RedisServer,
) -> None:
    async with run_stores(shared_redis, 2) as (a, b):
        await a.budget_publish("shop", 5000, window_ms=WINDOW_MS, ttl_ms=10_000)
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == 5000
        assert await a.budget_used("shop", window_ms=WINDOW_MS) == 0  # it counts its own
        await b.budget_add("shop", 700, window_ms=WINDOW_MS)
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == 5700
        await a.budget_publish("shop", 0, window_ms=WINDOW_MS, ttl_ms=10_000)  # withdrawn
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == 700
        client = shared_redis.client()
        assert client.hgetall(FLIGHT_KEY) == {}


async def test_reserve_admits_under_the_budget_and_publishes_only_then(
    shared_redis: RedisServer,
) -> None:
    async with run_stores(shared_redis, 2) as (a, b):
        await a.budget_publish("shop", 5000, window_ms=WINDOW_MS, ttl_ms=10_000)
        reserve = {"window_ms": WINDOW_MS, "publish": 1500, "ttl_ms": 10_000}
        # 5000 in flight on A + 1000 uncounted on B: not under 6000.
        assert await b.budget_reserve("shop", uncounted=1000, budget=6000, **reserve) == (
            False,
            5000,
        )
        assert await a.budget_used("shop", window_ms=WINDOW_MS) == 0  # nothing published
        assert await b.budget_reserve("shop", uncounted=1000, budget=6001, **reserve) == (
            True,
            5000,
        )
        assert await a.budget_used("shop", window_ms=WINDOW_MS) == 1500
        assert 10_000 < shared_redis.client().pttl(FLIGHT_KEY) <= 10_000 + WINDOW_MS


async def test_a_replica_that_stops_publishing_has_its_runs_counted_as_ended(
    shared_redis: RedisServer,
) -> None:
    """SIGKILL: its runs' keys stay for their window, but it will never count them."""
    async with run_stores(shared_redis, 2) as (a, b):
        await a.budget_publish("shop", 5000, window_ms=WINDOW_MS, ttl_ms=100)
        await asyncio.sleep(0.2)
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == 5000
        client = shared_redis.client()
        flight = client.hgetall(FLIGHT_KEY)
        assert a.replica.encode() not in flight  # its field is gone; a tombstone remembers
        assert flight[f"{a.replica}:d".encode()] == b"5000"
        (counter,) = client.keys("t:runs:{shop}:bytes:*")
        assert int(client.get(counter) or 0) == 5000
        assert 0 < client.pttl(counter) <= 2 * WINDOW_MS
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == 5000  # counted once


async def test_a_paused_replica_coming_back_takes_its_runs_back_from_the_dead_count(
    shared_redis: RedisServer,
) -> None:
    """SIGSTOP past the field's TTL: counted as a dead replica's ended runs, then alive again;
    its next publish (or its runs' count at their end) takes that amount back, so they are
    not counted twice (attack-11: one run 2.06x)."""
    async with run_stores(shared_redis, 2) as (a, b):
        await a.budget_publish("shop", 5000, window_ms=WINDOW_MS, ttl_ms=100)
        await asyncio.sleep(0.2)
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == 5000  # taken for dead
        await a.budget_publish("shop", 6000, window_ms=WINDOW_MS, ttl_ms=10_000)  # back
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == 6000  # in flight, once
        await a.budget_add("shop", 6000, window_ms=WINDOW_MS)  # its run ended: counted
        await a.budget_publish("shop", 0, window_ms=WINDOW_MS, ttl_ms=10_000)
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == 6000
        # Paused again, then its run's end counted without a publish first: taken back too.
        await a.budget_publish("shop", 3000, window_ms=WINDOW_MS, ttl_ms=100)
        await asyncio.sleep(0.2)
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == 9000
        await a.budget_add("shop", 3000, window_ms=WINDOW_MS)
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == 9000
        assert shared_redis.client().hgetall(FLIGHT_KEY) == {}


async def test_near_the_budget_growth_is_published_before_it_is_written_and_withdrawn_at_close(
    shared_redis: RedisServer,
) -> None:
    async with run_stores(shared_redis, 2) as (a, b):
        uncounted = UncountedCosts()
        ledger = BudgetLedger(refresh=30, uncounted=uncounted, flight_ttl_ms=10_000)
        headroom = FLIGHT_HEADROOM_BYTES
        budget = 32 * headroom  # near at 8 headrooms; the headroom is within a sixteenth
        check = {"window_ms": WINDOW_MS, "budget": budget}
        uncounted.add("shop", 100)
        assert await ledger.admit(a, "shop", **check) == (True, 100, 0)
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == 0  # far: nothing published
        assert ledger.may_write("shop") is True  # far: from its own view, no round trip
        uncounted.add("shop", 8 * headroom)  # a quarter: near
        held = 8 * headroom + 100
        assert await ledger.admit(a, "shop", **check) == (True, held, 0)
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == held + headroom
        uncounted.add("shop", headroom // 2)  # within what it published: no round trip
        assert ledger.may_write("shop") is True
        uncounted.add("shop", headroom)  # past it: Redis decides, and publishes it first
        assert ledger.may_write("shop") is None
        assert await ledger.reserve_growth(a, "shop")
        local = held + headroom + headroom // 2
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == local + headroom
        # B's runs bring the application to its budget: A admits no more, nor grows.
        await b.budget_publish("shop", budget - local, window_ms=WINDOW_MS, ttl_ms=10_000)
        admitted, used, _ = await ledger.admit(a, "shop", **check)
        assert not admitted and used >= budget
        uncounted.add("shop", 2 * headroom)
        assert ledger.may_write("shop") is None
        assert not await ledger.reserve_growth(a, "shop")
        await b.budget_publish("shop", 0, window_ms=WINDOW_MS, ttl_ms=10_000)
        # A shuts down with its runs not ended (their end not recorded): its last publish is
        # what they hold, no headroom, to expire and count as a dead replica's runs.
        await ledger.close()
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == uncounted.get("shop")
        # Once they are counted, a shutdown withdraws (nothing held uncounted).
        ledger = BudgetLedger(refresh=30, uncounted=uncounted, flight_ttl_ms=10_000)
        assert (await ledger.admit(a, "shop", **check)).admitted  # near: published
        held = uncounted.get("shop")
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == held + headroom
        uncounted.add("shop", -held)
        await ledger.close()
        assert await b.budget_used("shop", window_ms=WINDOW_MS) == 0


async def test_a_run_counts_from_its_start_as_much_as_its_applications_runs_usually_cost(
    shared_redis: RedisServer,
) -> None:
    """Runs started at once on several replicas near the budget cost nothing visible until
    their events arrive: each counts from its start as the application's typical run."""
    upstream = HeldBigEvent(300_000)
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    env = {"SESSION_STORE": "redis", "REDIS_URL": shared_redis.url}
    settings = app_settings(server.make_url("/v1"), env, resumable=True)
    try:
        async with run_gateway(settings) as gw:
            registry = gw.app[RUNS_KEY]
            for _ in range(2):
                async with gw.client.post(
                    "/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
                ) as response:
                    assert "X-Run-Id" in response.headers
                    await read_events(response)
            await asyncio.sleep(0.1)  # both ended
            assert registry.uncounted.get("shop") == 0
            upstream.size = 10  # a small run: it still counts as the usual ones at first
            hold = asyncio.Event()
            upstream.hold = hold
            async with gw.client.post(
                "/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
            ) as response:
                assert "X-Run-Id" in response.headers
                assert registry.uncounted.get("shop") >= 300_000
                hold.set()
                await read_events(response)
    finally:
        await server.close()
