"""Thirteenth attack on resumable runs (branch attack-16, on main at de418c2): session 9's
fixes for attack-15's findings -- a replica's own tombstone left out of its own budget view
(`_READ_BUDGET`), a flight publish valued at send time, withdrawing when the application is
not near (`_flight_value`), checks queued behind a failed flight write failing with it
(`_flight_turn`), and a stop elsewhere on a cut run always setting its flag (`REQUEST_STOP`).

Findings (strict xfails when found, all fixed in session 9; each test's docstring has its figures):
- a far-path check's read, in flight while a run's burst made the application near and
  reserved its growth, takes the application out of `_near` with the run's pre-burst cost
  (`used`'s `extra`, valued before the await); the next refresh withdraws the field (0 in
  Redis while the run holds 620 KB), and another replica admits 900 KB more: 1.52x;
- `close()` withdraws the runs in flight even when its flush of the ended runs failed: an
  ended 400 KB run is counted nowhere (B sees 0; left alone, the field would have expired
  and been counted as a dead replica's);
- one timed-out background refresh publish fails every check queued behind it: 6 pumps end
  their runs with `run_store_unavailable` (upstreams closed) and a new run is relayed
  without resume, while Redis answers again at once (0 reservations sent);
- `BUDGET_ADD` takes a paused replica's whole tombstone back without publishing its field:
  its runs still in flight (400 KB) are counted nowhere until its next refresh; B reads
  100 KB and may admit 900 KB: 1.4x;
- a stop elsewhere on a SIGKILLed replica's live run answers `stopping` (for ever) while a
  resume there is told `run_orphaned` (the cut branch answers `ended` in the same case).
Held (plain tests): a replica's own tombstone is left out of its own view only, the others
still count it, 20 refused reservations take nothing back and its publish takes it back
once; a stranger's stop on a cut run elsewhere is a 404 and sets no flag, the owner's
answers `stopping` and stops it.

Harnesses as in tests/test_runs_budget_attacks12.py: `RedisRunStore`s on a redis-server of
the test's own driving `BudgetLedger`s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import cast

import aiohttp
import pytest
from aiohttp import web

from app.runs.budget import BudgetLedger
from app.runs.costs import UncountedCosts
from app.runs.store import RedisRunStore
from app.sessions.backend import StoreUnavailable
from tests.redis_server import RedisServer
from tests.runs_helpers import (
    CSRF,
    PaddedUpstream,
    budget_counted,
    error_code,
    flight_fields,
    read_events,
    redis_at,
    replica_field,
    resume_shop_run,
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


# -- 1. a far-path read in flight across a burst takes the application out of `_near` ---------


async def test_a_far_read_in_flight_across_a_burst_does_not_withdraw_the_burst(
    tier_integration: None, monkeypatch: pytest.MonkeyPatch, redis: RedisServer
) -> None:
    """Attack: replica A, far from a 1 MB budget (nothing counted), runs R (20 KB so far). A
    new run X's check takes the far path: `_check` reads `running` (20 KB) and `used()` sends
    a fresh read (the cached one is `refresh` seconds old). While that read is in flight R's
    pump gets a 600 KB burst: `note` makes the application near, `may_write` is None and
    `reserve_growth` publishes 620 KB + the headroom in Redis (admitted). X's read comes
    back: `used()` judges nearness with the `extra` read BEFORE the await (20 KB): 0 + 20 KB
    under a quarter of the budget, so `_near.discard`. Nothing calls `note` after it (`_check`
    returns), so at the field's next refresh `_flight_value` finds the application not near
    and sends 0: Redis holds nothing of A's 620 KB, until R's next batch (an agent calling a
    tool, thinking: minutes). B's check meanwhile admits a 900 KB run: 1.52x the budget.
    Expected: Redis holds at least what A's runs hold. Fix (app/runs/budget.py `used`/`_check`):
    judge nearness with `extra` valued after the read (`self._uncounted.get(app_id)`), or
    call `note(app_id)` after a discard (it re-adds `_near` from the current local)."""
    uncounted_a, uncounted_b = UncountedCosts(), UncountedCosts()
    ledger_a = BudgetLedger(refresh=0.05, uncounted=uncounted_a, flight_ttl_ms=300)
    ledger_b = BudgetLedger(refresh=0.05, uncounted=uncounted_b, flight_ttl_ms=300)
    async with run_stores(redis, 2) as (a, b):
        uncounted_a.add("shop", 20_000)  # R, started far from the budget
        assert (await ledger_a.admit(a, "shop", window_ms=WINDOW, budget=BUDGET)).admitted
        await asyncio.sleep(0.1)  # A's cached read is older than `refresh`
        real_used = a.budget_used
        replied = asyncio.Event()
        in_flight = asyncio.Event()

        async def slow_read(app_id: str, *, window_ms: int) -> int:
            used = await real_used(app_id, window_ms=window_ms)
            in_flight.set()
            await replied.wait()  # its reply on its way (a busy loop, a slow network)
            return used

        monkeypatch.setattr(a, "budget_used", slow_read)
        x = asyncio.create_task(ledger_a.admit(a, "shop", window_ms=WINDOW, budget=BUDGET))
        await asyncio.wait_for(in_flight.wait(), 5)
        # R's burst, while X's read is in flight.
        uncounted_a.add("shop", 600_000)
        ledger_a.note("shop")
        may = ledger_a.may_write("shop")
        grown = await ledger_a.reserve_growth(a, "shop") if may is None else may
        reserved = replica_field(redis, a)
        replied.set()
        x_admitted = (await asyncio.wait_for(x, 5)).admitted
        await asyncio.sleep(0.5)  # ~5 refresh periods, no batch of R's (it thinks)
        held = uncounted_a.get("shop")
        holds = replica_field(redis, a)
        b_sees = await b.budget_used("shop", window_ms=WINDOW)
        uncounted_b.add("shop", 900_000)
        b_admitted = (await ledger_b.admit(b, "shop", window_ms=WINDOW, budget=BUDGET)).admitted
        total = held + (900_000 if b_admitted else 0)
        await ledger_a.close()
        await ledger_b.close()
        print(
            f"R's growth: may_write {may} -> reserve_growth {grown}, field {reserved}; X "
            f"admitted {x_admitted}; 0.5 s later A's runs hold {held}, Redis holds {holds} "
            f"of them; B sees {b_sees}, admits a 900 KB run: {b_admitted} -> the "
            f"application's runs hold {total} ({total / BUDGET:.2f}x the budget)"
        )
        assert grown and reserved >= 620_000
        assert holds >= held, f"Redis holds {holds} of A's {held}: {total / BUDGET:.2f}x"


# -- 2. close() withdraws after a failed flush ---------------------------------------------


async def test_close_does_not_withdraw_runs_it_could_not_count(
    tier_integration: None, monkeypatch: pytest.MonkeyPatch, redis: RedisServer
) -> None:
    """Attack: near a 1 MB budget, A's run (400 KB) is published in Redis (its reservation).
    The run ends just as A shuts down; its cost goes to `unsent` and the flush's `budget_add`
    fails (a blip, or an OOM: at `maxmemory` Redis refuses the `INCRBY` but not the `HDEL`
    of a withdrawal). `close()` -- whose comment says "counted first, withdrawn after:
    never a moment when neither holds them" -- withdraws A's field anyway: the run's 400 KB
    stay in Redis for their window, in no counter and no field, while B admits 900 KB: 1.3x.
    Left alone, A's field would have expired and been counted as a dead replica's runs by
    the next read. Expected: after `close()`, what Redis knows of the application (B's view)
    covers A's ended run. Fix (app/runs/budget.py `close`): withdraw only the applications
    with nothing left in `_unsent` (else leave the field to expire: counted as dead)."""
    uncounted = UncountedCosts()
    ledger = BudgetLedger(refresh=60.0, uncounted=uncounted, flight_ttl_ms=300)
    async with run_stores(redis, 2) as (a, b):
        uncounted.add("shop", 400_000)
        assert (await ledger.admit(a, "shop", window_ms=WINDOW, budget=BUDGET)).admitted
        published = replica_field(redis, a)
        failed: list[int] = []

        async def refused_add(app_id: str, cost: int, *, window_ms: int) -> None:
            failed.append(cost)
            raise StoreUnavailable("OOM command not allowed when used memory > 'maxmemory'")

        monkeypatch.setattr(a, "budget_add", refused_add)
        # The run ends (`_record_end`: counted via `add`, then `_settle_cost`), at shutdown.
        ledger.add(a, "shop", 400_000, window_ms=WINDOW, keep=WINDOW / 1000)
        uncounted.add("shop", -400_000)
        ledger.note("shop")
        await asyncio.wait_for(ledger.close(), 10)
        await asyncio.sleep(0.5)  # past the field's TTL: had it stayed, it counts as dead
        b_sees = await b.budget_used("shop", window_ms=WINDOW)
        counted = budget_counted(redis, "shop")
        print(
            f"A published {published}; its run ended (400000), budget_add failed "
            f"{len(failed)} times; after close() Redis holds field {replica_field(redis, a)}, "
            f"counters {counted}: B sees {b_sees} -> B may admit {BUDGET - b_sees} more "
            f"({(BUDGET - b_sees + 400_000) / BUDGET:.2f}x)"
        )
        assert failed
        assert b_sees >= 400_000, f"A's ended 400 KB counted nowhere; B sees {b_sees}"


# -- 3. one failed background refresh fails every check queued behind it -------------------


class _BlipStore:
    """What `BudgetLedger` asks of a run store, near a 1 MB budget (400 KB counted), every
    reservation admitted in 10 ms; the next flight publish after `blip` is set waits `stall`
    seconds and fails (one command timed out: a slow script, a dropped connection), once."""

    def __init__(self, stall: float) -> None:
        self.stall = stall
        self.blip = False
        self.publishing = asyncio.Event()
        self.reserves = 0
        self.publishes: list[tuple[int, bool]] = []

    async def budget_used(self, app_id: str, *, window_ms: int) -> int:
        await asyncio.sleep(0.01)
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
        await asyncio.sleep(0.01)
        self.reserves += 1
        return True, 400_000

    async def budget_publish(
        self, app_id: str, flight: int, *, window_ms: int, ttl_ms: int
    ) -> None:
        if self.blip:
            self.blip = False
            self.publishing.set()
            await asyncio.sleep(self.stall)
            self.publishes.append((flight, False))
            raise StoreUnavailable(f"TimeoutError: no answer within {self.stall} s")
        await asyncio.sleep(0.01)
        self.publishes.append((flight, True))

    async def budget_add(self, app_id: str, cost: int, *, window_ms: int) -> None:
        await asyncio.sleep(0.01)


async def test_a_failed_background_refresh_does_not_fail_the_checks_behind_it() -> None:
    """Attack on `_flight_turn`'s fail-together: near a 1 MB budget, A's runs are published;
    the field's refresh (`_refresh_flight`, a background write nobody waits for: its failure
    keeps the old field alive and is retried) meets one slow command and times out. Six
    pumps whose bursts outgrew the field queued their `reserve_growth` behind it, and a
    browser's new run its admission. The refresh fails: every one of them raises
    `StoreUnavailable` without asking Redis -- which answers again at once -- so six runs end
    with `run_store_unavailable` (the pump returns it: the upstream is closed, the agents'
    answers cut short) and the new run is relayed without resume. Before the fix each would
    have sent its own reservation (all admitted here). Expected: checks queued behind a failed
    background publish send their own; the frozen-Redis bound (attack-15) holds if only the
    failures of checks (`_flight_turn` bodies) fail the waiters: at most the publish's
    deadline plus one check's. Fix (app/runs/budget.py `_send_flight`): do not count a
    publish's failure in `_flight_failures` (or count it only for the waiters that queued
    while it was sent and let the first of them try once)."""
    uncounted = UncountedCosts()
    ledger = BudgetLedger(refresh=60.0, uncounted=uncounted, flight_ttl_ms=600)
    store = _BlipStore(stall=0.3)
    redis_store = cast(RedisRunStore, store)
    uncounted.add("shop", 100_000)
    assert (await ledger.admit(redis_store, "shop", window_ms=WINDOW, budget=BUDGET)).admitted
    store.blip = True
    await asyncio.wait_for(store.publishing.wait(), 5)  # the refresh (0.2 s), stalled
    reserves_before = store.reserves
    outcomes: list[str] = []

    async def pump() -> None:
        uncounted.add("shop", 80_000)  # its burst, past what was published
        assert ledger.may_write("shop") is None
        try:
            outcomes.append(str(await ledger.reserve_growth(redis_store, "shop")))
        except StoreUnavailable:
            outcomes.append("run_store_unavailable")

    async def start() -> str:
        try:
            admission = await ledger.admit(redis_store, "shop", window_ms=WINDOW, budget=BUDGET)
        except StoreUnavailable:
            return "relayed without resume"
        return "admitted" if admission.admitted else "over budget"

    pumps = [asyncio.create_task(pump()) for _ in range(6)]
    await asyncio.sleep(0.01)
    started = await asyncio.wait_for(start(), 10)
    await asyncio.wait_for(asyncio.gather(*pumps), 10)
    reserves = store.reserves - reserves_before
    await ledger.close()
    print(
        f"refresh publishes {store.publishes}; the 6 pumps queued behind it: {outcomes}; the "
        f"new run: {started}; reservations sent after the failure: {reserves}"
    )
    assert "run_store_unavailable" not in outcomes, outcomes
    assert started == "admitted", started


# -- held: a replica's own tombstone ---------------------------------------------------------


async def test_a_replica_s_own_tombstone_is_left_out_of_its_view_only(
    tier_integration: None, redis: RedisServer
) -> None:
    """Attack on `_READ_BUDGET`'s own-tombstone subtraction: A (150 KB in flight, field
    150 KB + headroom) is taken for dead by B (the counter gets its field); B's run ends
    meanwhile (300 KB into the same counter); A's own read, a refused reservation (asking
    for far more than the budget: refused, so no take-back) repeated 20 times, then A's
    publish. Held: A's view leaves out exactly its tombstone (300 KB of B's); B's view keeps
    A's tombstone until A's publish; refused reservations take nothing back (the counter
    unchanged); the publish takes back the tombstone once: the counter is B's 300 KB."""
    async with run_stores(redis, 2) as (a, b):
        ok, _ = await a.budget_reserve(
            "shop",
            window_ms=WINDOW,
            uncounted=150_000,
            budget=BUDGET,
            publish=166_000,
            ttl_ms=100,
        )
        assert ok
        await asyncio.sleep(0.2)
        b_dead = await b.budget_used("shop", window_ms=WINDOW)  # A taken for dead
        await b.budget_add("shop", 300_000, window_ms=WINDOW)
        a_view = await a.budget_used("shop", window_ms=WINDOW)
        refused = [
            await a.budget_reserve(
                "shop",
                window_ms=WINDOW,
                uncounted=BUDGET,
                budget=BUDGET,
                publish=BUDGET,
                ttl_ms=10_000,
            )
            for _ in range(20)
        ]
        b_view = await b.budget_used("shop", window_ms=WINDOW)
        counted_before = budget_counted(redis, "shop")
        await a.budget_publish("shop", 150_000, window_ms=WINDOW, ttl_ms=10_000)
        counted_after = budget_counted(redis, "shop")
        b_after = await b.budget_used("shop", window_ms=WINDOW)
        print(
            f"B took A for dead: {b_dead}; A's own view {a_view}; 20 refused reservations: "
            f"{set(refused)}; B's view {b_view}, counters {counted_before}; after A's "
            f"publish: counters {counted_after}, B sees {b_after}"
        )
        assert b_dead == 166_000
        assert a_view == 300_000
        assert all(r == (False, 300_000) for r in refused)
        assert b_view == 466_000 and counted_before == 466_000
        assert counted_after == 300_000 and b_after == 450_000


async def test_checks_after_a_failed_publish_are_not_failed_by_it() -> None:
    """Attack on `_flight_turn`'s failure generation: a background refresh fails (0.3 s
    timeout); pumps whose bursts come after it failed (Redis answers again), and a new run's
    admission. Held: none of them fails for the old failure (each reservation sent)."""
    uncounted = UncountedCosts()
    ledger = BudgetLedger(refresh=60.0, uncounted=uncounted, flight_ttl_ms=600)
    store = _BlipStore(stall=0.3)
    redis_store = cast(RedisRunStore, store)
    uncounted.add("shop", 100_000)
    assert (await ledger.admit(redis_store, "shop", window_ms=WINDOW, budget=BUDGET)).admitted
    store.blip = True
    await asyncio.wait_for(store.publishing.wait(), 5)
    while not store.publishes:  # until the refresh has failed
        await asyncio.sleep(0.01)
    reserves_before = store.reserves
    outcomes: list[bool] = []
    for _ in range(3):
        uncounted.add("shop", 200_000)
        assert ledger.may_write("shop") is None
        outcomes.append(await asyncio.wait_for(ledger.reserve_growth(redis_store, "shop"), 5))
    admission = await asyncio.wait_for(
        ledger.admit(redis_store, "shop", window_ms=WINDOW, budget=BUDGET), 5
    )
    reserves = store.reserves - reserves_before
    await ledger.close()
    print(
        f"after the failed refresh {store.publishes[:1]}: growths {outcomes}, a new run "
        f"admitted {admission.admitted}; {reserves} reservations sent"
    )
    assert outcomes == [True] * 3 and admission.admitted and reserves == 4


# -- 5. a count takes the tombstone back without publishing the runs still in flight --------


async def test_a_count_does_not_take_back_a_tombstone_of_runs_still_in_flight(
    tier_integration: None, monkeypatch: pytest.MonkeyPatch, redis: RedisServer
) -> None:
    """Attack on `_TAKE_BACK` in `BUDGET_ADD`: near a 1 MB budget A holds 500 KB in flight
    (two runs), published 562.5 KB. Its refreshes fail for longer than the field's TTL (its
    connection to Redis down, a slow Redis for its pool: `_send_flight` keeps `confirmed`
    and retries every third of the TTL); B's read takes A for dead: the counter gets A's
    562.5 KB, the tombstone keeps them. Redis answers A again; A's first write is the count of
    its 100 KB run that ended meanwhile (near the budget: flushed at once) -- `BUDGET_ADD`
    takes the whole tombstone back (562.5 KB) and adds 100 KB, but A's field is not
    published again: A's other run's 400 KB are in no counter, no field, no tombstone, until
    A's next refresh (up to a third of the TTL: 1.3 s with the defaults). B reads 100 KB and
    may admit 900 KB: 1.4x the budget. Expected: B's view covers A's runs (500 KB) right
    after the count. Fix (app/runs/scripts.py `BUDGET_ADD`): take back only what the count
    covers (`min(tombstone, ARGV[2])`, the rest stays a tombstone), or re-create the caller's
    field from the tombstone minus the count, with a short TTL, in the same step."""
    uncounted = UncountedCosts()
    ledger = BudgetLedger(refresh=60.0, uncounted=uncounted, flight_ttl_ms=1500)
    async with run_stores(redis, 2) as (a, b):
        uncounted.add("shop", 500_000)
        assert (await ledger.admit(a, "shop", window_ms=WINDOW, budget=BUDGET)).admitted
        published = replica_field(redis, a)
        real_publish = a.budget_publish
        failed: list[int] = []

        async def down(app_id: str, flight: int, *, window_ms: int, ttl_ms: int) -> None:
            failed.append(flight)
            raise StoreUnavailable("ConnectionError: A's connection to Redis is down")

        monkeypatch.setattr(a, "budget_publish", down)
        await asyncio.sleep(1.8)  # past the field's TTL, its refreshes failing
        b_dead = await b.budget_used("shop", window_ms=WINDOW)
        tries = len(failed)
        while len(failed) == tries:  # just after a refresh failed: the next in a third of 1.5 s
            await asyncio.sleep(0.002)
        monkeypatch.setattr(a, "budget_publish", real_publish)  # Redis answers A again
        # A's 100 KB run ended meanwhile: counted at once (near), its cost no longer in flight.
        ledger.add(a, "shop", 100_000, window_ms=WINDOW, keep=WINDOW / 1000)
        uncounted.add("shop", -100_000)
        ledger.note("shop")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2
        while "shop" in ledger._unsent and loop.time() < deadline:  # the count landed
            await asyncio.sleep(0.002)
        b_after = await b.budget_used("shop", window_ms=WINDOW)
        flight = flight_fields(redis)
        held = uncounted.get("shop")
        await asyncio.sleep(0.6)  # A's next refresh
        b_later = await b.budget_used("shop", window_ms=WINDOW)
        await ledger.close()
        print(
            f"A published {published}; {len(failed)} refreshes failed; B took A for dead: "
            f"{b_dead}; A's count of 100000 landed: hash {flight}, B sees {b_after} while A "
            f"holds {held} in flight -> B may admit {BUDGET - b_after} "
            f"({(BUDGET - b_after + held + 100_000) / BUDGET:.2f}x); after A's refresh B sees "
            f"{b_later}"
        )
        assert b_dead == published
        assert b_after >= held + 100_000, f"B sees {b_after}; A holds {held} + 100000"


# -- 4. a stop elsewhere on a dead replica's live run ---------------------------------------


async def test_a_stop_elsewhere_on_a_dead_replica_s_run_answers_ended(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack on `stop_run`'s answer (its cut branch now answers from the heartbeat key, the
    live branch does not): a kept run (far within a 16 MiB budget) pumps on A; A is
    SIGKILLed. Past 4 heartbeats (its key gone) a resume on B is told `run_orphaned` -- and a
    stop on B answers 202 `stopping`, a state that never ends: nothing pumps the run, no
    `run_stopped` ever comes, the flag waits in the meta for its window. The same stop of a
    cut run answers `ended` once its heartbeat key is gone (attack-15's fix). Expected:
    `ended`, as the resume says. Fix (app/runs/http.py `stop_run`): answer from
    `request_stop`'s result in the live branch too (`stopping` only while the heartbeat key
    lives)."""
    upstream = _FirstLongUpstream(delay=0.2, count=150)
    async with two_shop_gateways(tmp_path, redis, upstream, budget=16 * 1024 * 1024) as (
        a,
        b,
        http,
    ):
        async with http.post(
            f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "go"}
        ) as response:
            run_id = response.headers["X-Run-Id"]
            got = await asyncio.wait_for(read_events(response, 3), 10)
            a.kill()
        await asyncio.sleep(1.5)  # past 4 heartbeats of 0.25 s: its key gone
        status, events, _ = await resume_shop_run(http, b.url, run_id, len(got))
        resumed = error_code(events[-1]) if events else None
        stopped = await stop_shop_run(http, b.url, run_id)
        print(
            f"A SIGKILLed after {len(got)} events; 1.5 s later a resume on B: {status} "
            f"{resumed}; a stop on B: {stopped}"
        )
        assert status == 200 and resumed == "run_orphaned"
        assert stopped[0] == 202
        assert '"ended"' in stopped[1], stopped


# -- held: a stop elsewhere on another session's cut run -------------------------------------


class _FirstLongUpstream(PaddedUpstream):
    """A `PaddedUpstream` for its first request; any later one: one small event, `done`."""

    def __init__(self, delay: float, count: int) -> None:
        super().__init__(delay, count)
        self.requests = 0

    async def write_events(self, response: web.StreamResponse) -> None:
        self.requests += 1
        if self.requests == 1:
            await super().write_events(response)
            return
        await response.write(b'event: token\ndata: {"n": 0}\n\n')
        await response.write(b"event: done\ndata: {}\n\n")


def _meta_of(redis: RedisServer, run_id: str) -> dict[bytes, bytes]:
    client = redis.client()
    keys = list(client.scan_iter(match=f"*run:{{{run_id}}}:m".encode()))
    return cast(dict[bytes, bytes], client.hgetall(keys[0])) if keys else {}


async def test_a_stop_elsewhere_on_another_session_s_cut_run_is_refused(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack on `stop_run`'s cut branch (the flag now set whatever the heartbeat key says):
    a run of a 256 KiB budget is cut over it on A and pumps on; another browser (its own
    session, its own conversation) posts a stop of that run id on B, then its owner does.
    Held: the other session gets 404 and the run's meta gets no `stop` flag (the run pumps
    on); the owner's stop on B answers `stopping` and the run stops within a few heartbeats."""
    upstream = _FirstLongUpstream(delay=0.1, count=300)
    async with (
        two_shop_gateways(tmp_path, redis, upstream) as (a, b, http),
        http.post(
            f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "go"}
        ) as response,
    ):
        run_id = response.headers["X-Run-Id"]
        got = await asyncio.wait_for(read_events(response, 45), 30)
        status, written, _ = await resume_shop_run(http, b.url, run_id, len(got))
        assert status == 200 and error_code(written[-1]) == "run_over_budget"
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as other:
            async with other.post(
                f"{b.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
            ) as mine:
                await asyncio.wait_for(read_events(mine), 10)
            stranger = await stop_shop_run(other, b.url, run_id)
        flag_after_stranger = b"stop" in _meta_of(redis, run_id)
        await asyncio.sleep(1.0)
        pumping = not upstream.cancelled.is_set()
        owner = await stop_shop_run(http, b.url, run_id)
        with suppress(TimeoutError):
            await asyncio.wait_for(upstream.cancelled.wait(), 5)
        print(
            f"cut after ~{len(got)} events; a stranger's stop on B: {stranger}, flag set "
            f"{flag_after_stranger}, still pumping 1 s later {pumping}; the owner's stop "
            f"on B: {owner}; stopped {upstream.cancelled.is_set()}"
        )
        assert stranger[0] == 404 and not flag_after_stranger and pumping
        assert owner[0] == 202 and '"stopping"' in owner[1]
        assert upstream.cancelled.is_set()
