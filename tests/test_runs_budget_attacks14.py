"""Fourteenth attack on resumable runs (branch attack-17, on main at a3d6154): session 9's
fixes for attack-16's findings -- `used()` judging nearness with the runs' cost after its
read, `close()` keeping the field of an application whose ended runs it could not count, a
failed background publish no longer failing the checks behind it (`_flight_turn`), a count
taking back only its share of a paused replica's tombstone (`_TAKE_BACK` in `BUDGET_ADD`),
and a stop elsewhere on a live run answering by its heartbeat key.

Findings (strict xfails when found, both fixed in session 9; each test's docstring has its figures):
- `close()` withdraws the runs in flight of an application whose runs' END could not be
  recorded at shutdown (`_record_end`'s `store.end` failed: nothing goes to `_unsent`, the
  run's cost stays in `UncountedCosts` until its keys expire): its 400 KB stay in Redis in
  no counter and no field; B sees 0 and may admit the whole budget: 1.4x. (By reading the code,
  not measured here: a pump whose end outlasts `_CLOSE_SECONDS` is cancelled the same way.)
- `close()` keeps such an application's field at the last value Redis accepted, stale when a
  shrink failed in the same blip: 562.5 KB for 100 KB uncounted, counted as a dead
  replica's on top of the 400 KB counted -- B sees 962.5 KB for 500 KB held and admits
  37.5 KB of the 500 KB free (under-admission for the counter slot's life).
Held (plain tests): a count of ended runs after a pause takes back only its share of the
tombstone, and the publish after it the rest, B's view covering A's runs throughout (and
counting them once); a frozen Redis delays every queued check by 2.0 op timeouts at most;
a stop answered `ended` on a stalled replica's live run stops it when the replica thaws.

Harnesses as in tests/test_runs_budget_attacks13.py: `RedisRunStore`s on a redis-server of
the test's own driving `BudgetLedger`s.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import cast

import aiohttp
import pytest

from app.runs.budget import BudgetLedger
from app.runs.costs import UncountedCosts
from app.runs.store import RedisRunStore
from app.sessions.backend import StoreUnavailable
from tests.redis_server import RedisServer
from tests.runs_helpers import (
    CSRF,
    PaddedUpstream,
    budget_counted,
    flight_fields,
    read_events,
    redis_at,
    replica_field,
    run_stores,
    stop_shop_run,
    two_shop_gateways,
)

pytestmark = pytest.mark.redis_server

BUDGET = 1_000_000
WINDOW = 60_000


@pytest.fixture
def redis(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("256mb", "noeviction") as server:
        yield server


# -- 1. close() withdraws runs whose end could not be recorded --------------------------------


async def test_close_does_not_withdraw_runs_whose_end_was_not_recorded(
    tier_integration: None, redis: RedisServer
) -> None:
    """Attack on `close()`'s new condition (withdraw unless `_unsent`): near a 1 MB budget,
    A's run (400 KB written to Redis) is published in Redis (its reservation). A shuts down;
    the pump ends (`shutting_down`) and `_record_end`'s `store.end` fails (a blip: the same
    one a flush failure stands for in attack-16's test). Then nothing goes to `_unsent` --
    `add` is only called after `end` succeeded -- and `_settle_cost` keeps the run's cost in
    `UncountedCosts` until its keys expire (`call_later(ttl)`): the ledger KNOWS 400 KB of
    its application are in Redis uncounted (`_local` = 400 KB). Redis answers again;
    `close()` finds nothing in `_unsent` and withdraws the field: the run's 400 KB (its
    events, written with their TTL: a window) are in no counter, no field, no tombstone.
    B sees 0 and may admit 1 MB: 1.4x the budget. Expected: after `close()`, B's view covers
    A's 400 KB. Fix (app/runs/budget.py `close`): withdraw only applications with
    `_local(app_id) <= 0` (nothing uncounted here: not in `_unsent`, nothing in
    `UncountedCosts`); else leave the field to expire and be counted as a dead replica's.
    By reading the code (not measured here), the same happens without a failed command when
    a pump's end outlasts `_CLOSE_SECONDS` (2 s: a long backlog to write, a slow Redis):
    `RunRegistry.close` cancels it inside `store.end`, `_settle_cost` defers its uncount,
    `_unsent` is empty."""
    uncounted = UncountedCosts()
    ledger = BudgetLedger(refresh=60.0, uncounted=uncounted, flight_ttl_ms=300)
    async with run_stores(redis, 2) as (a, b):
        uncounted.add("shop", 400_000)  # the run's cost (`_note_cost`)
        assert (await ledger.admit(a, "shop", window_ms=WINDOW, budget=BUDGET)).admitted
        published = replica_field(redis, a)
        # Shutdown: `_record_end`'s `store.end` raised StoreUnavailable -> no `add`, and
        # `_settle_cost` defers the uncount by the run's TTL (the cost stays uncounted here).
        local = ledger._local("shop")
        await asyncio.wait_for(ledger.close(), 10)
        after_close = replica_field(redis, a)
        await asyncio.sleep(0.5)  # past the field's TTL: had it stayed, it counts as dead
        b_sees = await b.budget_used("shop", window_ms=WINDOW)
        counted = budget_counted(redis, "shop")
        print(
            f"A published {published}; its run's end failed (400000 uncounted, local {local}); "
            f"after close() field {after_close}, counters {counted}: B sees {b_sees} -> B may "
            f"admit {BUDGET - b_sees} more ({(BUDGET - b_sees + 400_000) / BUDGET:.2f}x)"
        )
        assert local == 400_000
        assert b_sees >= 400_000, f"A's 400 KB counted nowhere; B sees {b_sees}"


# -- 2. close() leaves a stale field that counts as dead twice what is uncounted ------------


async def test_close_does_not_leave_a_field_above_what_it_could_not_count(
    tier_integration: None, monkeypatch: pytest.MonkeyPatch, redis: RedisServer
) -> None:
    """Attack on `close()`'s new keep (an application with ended runs not counted keeps its
    field, to expire and be counted as a dead replica's): near a 1 MB budget, A's runs (400
    KB + 100 KB) are published as 562.5 KB. A Redis blip at shutdown: the 400 KB run ends, its
    count lands, but the shrink that follows (`note`: 562.5 KB > 100 KB + 2 headrooms) fails;
    the 100 KB run ends and its count fails. `close()` leaves the field as it is -- 562.5 KB,
    the last value Redis accepted, 462.5 KB of it already counted or headroom -- and sends
    nothing (the refresh that would have shrunk it is cancelled), though Redis answers
    publishes again. The field expires and B's read counts it as a dead replica's: 400 KB +
    562.5 KB = 962.5 KB for 500 KB held. B refuses every run above 37.5 KB while half the
    budget is free, for the counter slot's life (a window or more). Expected: B sees at most
    what A's runs hold plus a headroom (562.5 KB). Fix (app/runs/budget.py `close`): for the
    applications it keeps, publish the field once more valued at `_local` (what is really
    uncounted: the unsent counts and the runs not ended), instead of leaving the old value."""
    uncounted = UncountedCosts()
    ledger = BudgetLedger(refresh=60.0, uncounted=uncounted, flight_ttl_ms=300)
    async with run_stores(redis, 2) as (a, b):
        uncounted.add("shop", 500_000)
        assert (await ledger.admit(a, "shop", window_ms=WINDOW, budget=BUDGET)).admitted
        published = replica_field(redis, a)
        real_publish, real_add = a.budget_publish, a.budget_add
        failed: list[str] = []

        async def publish_down(app_id: str, flight: int, *, window_ms: int, ttl_ms: int) -> None:
            failed.append(f"publish {flight}")
            raise StoreUnavailable("TimeoutError: a blip")

        async def add_down(app_id: str, cost: int, *, window_ms: int) -> None:
            failed.append(f"add {cost}")
            raise StoreUnavailable("TimeoutError: a blip")

        monkeypatch.setattr(a, "budget_publish", publish_down)
        loop = asyncio.get_running_loop()
        # The 400 KB run ends: its count lands (near: at once), its shrink fails.
        ledger.add(a, "shop", 400_000, window_ms=WINDOW, keep=WINDOW / 1000)
        uncounted.add("shop", -400_000)
        ledger.note("shop")
        deadline = loop.time() + 2
        while "shop" in ledger._unsent and loop.time() < deadline:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)  # the shrink that followed, failed
        monkeypatch.setattr(a, "budget_add", add_down)
        # The 100 KB run ends at shutdown: its count fails.
        ledger.add(a, "shop", 100_000, window_ms=WINDOW, keep=WINDOW / 1000)
        uncounted.add("shop", -100_000)
        ledger.note("shop")
        await asyncio.sleep(0.02)
        monkeypatch.setattr(a, "budget_publish", real_publish)  # the blip is over for these
        await asyncio.wait_for(ledger.close(), 10)
        after_close = replica_field(redis, a)
        monkeypatch.setattr(a, "budget_add", real_add)
        await asyncio.sleep(0.5)  # past the field's TTL: counted as dead
        b_sees = await b.budget_used("shop", window_ms=WINDOW)
        counted = budget_counted(redis, "shop")
        print(
            f"A published {published}; failures {failed}; after close() the field holds "
            f"{after_close} for 100000 uncounted; counted as dead: counters {counted}, B sees "
            f"{b_sees} for 500000 held -> B may admit {BUDGET - b_sees} of {BUDGET - 500_000} free"
        )
        assert any(f.startswith("publish") for f in failed)
        assert any(f.startswith("add") for f in failed)
        assert 500_000 <= b_sees <= 500_000 + (published - 500_000), f"B sees {b_sees}"


# -- held: a frozen Redis delays a queued check by two op timeouts at most --------------------


class _FrozenStore:
    """What `BudgetLedger` asks of a run store, near a 1 MB budget (400 KB counted); while
    `frozen`, every command waits `stall` seconds (the op timeout) and fails."""

    def __init__(self, stall: float) -> None:
        self.stall = stall
        self.frozen = False
        self.publishing = asyncio.Event()
        self.calls: list[str] = []

    async def _op(self, name: str) -> None:
        self.calls.append(name)
        if self.frozen:
            await asyncio.sleep(self.stall)
            raise StoreUnavailable(f"TimeoutError: no answer within {self.stall} s")
        await asyncio.sleep(0.005)

    async def budget_used(self, app_id: str, *, window_ms: int) -> int:
        await self._op("read")
        return 400_000

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
        await self._op("reserve")
        return True, 400_000

    async def budget_publish(
        self, app_id: str, flight: int, *, window_ms: int, ttl_ms: int
    ) -> None:
        if self.frozen:
            self.publishing.set()
        await self._op("publish")

    async def budget_add(self, app_id: str, cost: int, *, window_ms: int) -> None:
        await self._op("add")


async def test_a_frozen_redis_delays_queued_checks_by_two_timeouts_at_most() -> None:
    """Attack on `_flight_turn` now that a failed background publish no longer counts: Redis
    freezes (every command times out after T = 0.4 s). A's field refresh is the first write
    to meet it; six pumps' `reserve_growth` and a new run's admission queue behind it; a
    second wave (three more pumps, an admission) arrives 1.5 T later, behind the first
    wave's failure and the refresh that a pump's shrink queued again; the refreshes keep
    coming every third of the flight TTL (0.3 s < T). Each check should answer within
    about two op timeouts of its arrival (the publish it queued behind, then its own or a
    failure it shares), not queue behind one publish per refresh. Measured: the slowest."""
    stall = 0.4
    uncounted = UncountedCosts()
    ledger = BudgetLedger(refresh=60.0, uncounted=uncounted, flight_ttl_ms=900)
    store = _FrozenStore(stall)
    redis_store = cast(RedisRunStore, store)
    uncounted.add("shop", 100_000)
    assert (await ledger.admit(redis_store, "shop", window_ms=WINDOW, budget=BUDGET)).admitted
    store.frozen = True
    await asyncio.wait_for(store.publishing.wait(), 5)  # the refresh, frozen
    loop = asyncio.get_running_loop()
    waits: list[tuple[str, float, str]] = []

    async def check(kind: str) -> None:
        began = loop.time()
        outcome = "ok"
        try:
            if kind == "pump":
                uncounted.add("shop", 80_000)  # its burst, past what was published
                if ledger.may_write("shop") is None:
                    outcome = str(await ledger.reserve_growth(redis_store, "shop"))
            else:
                admission = await ledger.admit(redis_store, "shop", window_ms=WINDOW, budget=BUDGET)
                outcome = str(admission.admitted)
        except StoreUnavailable:
            outcome = "unavailable"
        waits.append((kind, loop.time() - began, outcome))

    first = [asyncio.create_task(check("pump")) for _ in range(6)]
    first.append(asyncio.create_task(check("admit")))
    await asyncio.sleep(1.5 * stall)
    uncounted.add("shop", -400_000)  # a run ended elsewhere in the registry: a shrink
    ledger.note("shop")
    second = [asyncio.create_task(check("pump")) for _ in range(3)]
    second.append(asyncio.create_task(check("admit")))
    await asyncio.wait_for(asyncio.gather(*first, *second), 15)
    slowest = max(wait for _, wait, _ in waits)
    store.frozen = False
    await asyncio.wait_for(ledger.close(), 10)
    print(
        f"op timeout {stall} s; checks (kind, wait s, outcome): "
        f"{[(k, round(w, 2), o) for k, w, o in waits]}; slowest {slowest:.2f} s "
        f"({slowest / stall:.1f} op timeouts); Redis calls {store.calls.count('publish')} "
        f"publishes, {store.calls.count('reserve')} reservations"
    )
    assert slowest <= 2 * stall + 0.25, f"a check waited {slowest:.2f} s"


# -- held: counts after a pause take back their share of the tombstone, the publish the rest --


async def test_counts_after_a_pause_take_back_their_share_only(
    tier_integration: None, monkeypatch: pytest.MonkeyPatch, redis: RedisServer
) -> None:
    """Attack on `_TAKE_BACK`'s share in `BUDGET_ADD`: near a 1 MB budget A holds 500 KB in
    flight (runs of 100 KB and 400 KB), published 562.5 KB; its refreshes fail past the
    field's TTL and B's read takes A for dead (counter += 562.5 KB, tombstone 562.5 KB).
    Redis answers A again: its runs end one after the other, each counted at once (near):
    100 KB, then 400 KB (more than the tombstone's counter share left would allow if a count
    took more than its own). After each, B's view must cover what A's runs hold (500 KB:
    in flight or counted) and count it once (at most the headroom above); after A's next
    refresh (a withdrawal: nothing left in flight) B sees exactly 500 KB."""
    uncounted = UncountedCosts()
    ledger = BudgetLedger(refresh=60.0, uncounted=uncounted, flight_ttl_ms=600)
    async with run_stores(redis, 2) as (a, b):
        uncounted.add("shop", 500_000)
        assert (await ledger.admit(a, "shop", window_ms=WINDOW, budget=BUDGET)).admitted
        published = replica_field(redis, a)
        headroom = published - 500_000
        real_publish = a.budget_publish
        failed: list[int] = []

        async def down(app_id: str, flight: int, *, window_ms: int, ttl_ms: int) -> None:
            failed.append(flight)
            raise StoreUnavailable("ConnectionError: A's connection to Redis is down")

        monkeypatch.setattr(a, "budget_publish", down)
        await asyncio.sleep(0.8)  # past the field's TTL, its refreshes failing
        b_dead = await b.budget_used("shop", window_ms=WINDOW)
        tries = len(failed)
        while len(failed) == tries:  # just after a refresh failed: the next in 0.2 s
            await asyncio.sleep(0.002)
        monkeypatch.setattr(a, "budget_publish", real_publish)
        loop = asyncio.get_running_loop()
        views: list[tuple[int, int, dict[bytes, bytes]]] = []
        for cost in (100_000, 400_000):
            ledger.add(a, "shop", cost, window_ms=WINDOW, keep=WINDOW / 1000)
            uncounted.add("shop", -cost)
            ledger.note("shop")
            deadline = loop.time() + 2
            while "shop" in ledger._unsent and loop.time() < deadline:  # the count landed
                await asyncio.sleep(0.001)
            views.append(
                (cost, await b.budget_used("shop", window_ms=WINDOW), flight_fields(redis))
            )
        await asyncio.sleep(0.5)  # A's next refresh: a withdrawal
        b_later = await b.budget_used("shop", window_ms=WINDOW)
        later_flight = flight_fields(redis)
        await ledger.close()
        print(
            f"A published {published} (headroom {headroom}); {len(failed)} refreshes failed; "
            f"B took A for dead: {b_dead}; after each count (cost, B sees, hash): {views}; "
            f"after A's refresh B sees {b_later}, hash {later_flight}"
        )
        assert b_dead == published
        for cost, seen, _ in views:
            assert 500_000 <= seen <= 500_000 + headroom, f"after {cost}: B sees {seen}"
        assert b_later == 500_000, f"B sees {b_later} once A's runs all ended and counted"


# -- held: a stop elsewhere on a stalled replica's live run ----------------------------------


async def _drain(response: aiohttp.ClientResponse) -> int:
    count = 0
    with suppress(aiohttp.ClientError, TimeoutError):
        async for line in response.content:
            count += line.startswith(b"event:")
    return count


async def test_a_stop_answered_ended_on_a_stalled_replica_s_live_run_stops_it(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack on `stop_run`'s live branch (`ended` once the heartbeat key is gone): a kept
    run (a 16 MiB budget) pumps on A; A's process stalls 1.6 s (SIGSTOP: a GC pause, a
    blocked loop), past its heartbeat key's TTL (1 s). A stop on B answers `ended` -- which a
    UI takes as final: it stops showing the run as live. Held if that is not a lie for long:
    A, thawed, reads the flag at its next heartbeat and ends the run (the upstream hung up
    on within a few heartbeats), rather than pumping it on to its end."""
    upstream = PaddedUpstream(delay=0.1, count=400)
    async with (
        two_shop_gateways(tmp_path, redis, upstream, budget=16 * 1024 * 1024) as (a, b, http),
        http.post(
            f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "go"}
        ) as response,
    ):
        run_id = response.headers["X-Run-Id"]
        got = await asyncio.wait_for(read_events(response, 5), 10)
        a.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(1.6)  # past the heartbeat key's TTL (1 s)
            on_b = await asyncio.wait_for(stop_shop_run(http, b.url, run_id), 5)
        finally:
            a.signal(signal.SIGCONT)
        loop = asyncio.get_running_loop()
        thawed = loop.time()
        reading = asyncio.create_task(_drain(response))
        with suppress(TimeoutError):
            await asyncio.wait_for(upstream.cancelled.wait(), 4)
        took = loop.time() - thawed
        stopped = upstream.cancelled.is_set()
        if not stopped:
            await stop_shop_run(http, a.url, run_id)  # (cleanup: stop it where it runs)
        more = await asyncio.wait_for(reading, 10)
        print(
            f"{len(got)} events on A; A stalled 1.6 s; stop on B: {on_b}; A thawed: upstream "
            f"hung up on {stopped} after {took:.2f} s ({more} more events read on A)"
        )
        assert on_b[0] == 202 and '"ended"' in on_b[1], on_b
        assert stopped, "`ended` answered, yet the run pumps on"
