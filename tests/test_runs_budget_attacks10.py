"""Tenth attack on resumable runs (branch attack-13, on main at 04aaafc): the fixes for
attack-12's findings -- a cut run (`meta.end == "run_over_budget"`) still ticks its heartbeat
and stop flag without refreshing its keys' TTLs (`store.tick(keys=False)`), `stop_run` sets the
stop flag on a cut run, and a resume past the cut on another replica answers one
`event: error` `run_over_budget` (`_cut_answer`).

Findings (xfail strict, each with its measurements and a suggested fix): a cut run that
pumps longer than its keys' TTL (one window after the cut) can no longer be stopped or
resumed through another replica -- its meta expired, so `stop` answers 404 and the upstream
streams on to the pumping replica; a resume there answers 404 instead of the cut's error.
A cut run that has finished since still answers `stop` elsewhere with 202 `stopping` (and a
stop flag is written into its meta), never `ended` (the pumping replica says `ended`): the meta
says `run_over_budget` forever. Near the budget, one failed refresh of the runs in flight
makes the next refresh (which re-sends the published value unchanged, attack-12's fix) send
the failure marker -1, which Redis takes for "none" (HDEL): this replica's runs vanish from
every other replica's checks, and nothing refreshes them until their next batch. Held: a
resume past the cut on another replica of a finished cut run gets the cut's error; near the
budget 200 batches of 1000 B cost 3 `budget_reserve` round trips (one per 62500 B headroom),
not one per batch.

Each test plays a hostile application owner (its upstream) and its browsers against two real
gateway processes sharing a redis-server of its own (harness: tests/test_runs_budget_attacks9.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from app.runs.budget import BudgetLedger
from app.runs.costs import UncountedCosts
from app.runs.store import RedisRunStore
from app.sessions.backend import StoreUnavailable
from tests.redis_server import RedisServer
from tests.runs_helpers import (
    CSRF,
    PaddedUpstream,
    error_code,
    read_events,
    redis_at,
    resume_shop_run,
    stop_shop_run,
    two_shop_gateways,
)

pytestmark = pytest.mark.redis_server


@pytest.fixture
def redis(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("256mb", "noeviction") as server:
        yield server


async def _stopped_within(upstream: PaddedUpstream, seconds: float) -> bool:
    try:
        await asyncio.wait_for(upstream.cancelled.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def test_a_cut_run_outliving_its_keys_can_still_be_stopped_through_another_replica(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: a run of a 3 s window is cut over its 256 KiB budget while its upstream
    streams on for ~40 s (an agent answering for minutes) to its browser on A. A cut run
    ticks with `keys=False`: its meta's TTL is not refreshed, so one window after the cut it
    is gone from Redis while the run still pumps on A. The user presses stop; the load
    balancer sends it to B. Expected (app/runs/http.py: the pump, wherever it runs, ends the
    run within a heartbeat and cancels the upstream): 202 and the upstream cancelled within
    a few seconds; a resume on B past the cut gets the cut's error, not 404. Fix
    (app/runs/runs.py `_tick`, app/runs/store.py `tick`): keep refreshing the meta's TTL
    (only the meta, a few hundred bytes, counted in the run's overhead) while a cut run
    pumps, or let the heartbeat key carry the owner/app so `stop_run` can find a live run
    whose meta expired.
    Fixed (session 8): a cut run's tick keeps its meta key alive (not its events)."""
    upstream = PaddedUpstream(delay=0.1, count=400)
    async with two_shop_gateways(tmp_path, redis, upstream, window=3) as (a, b, http):
        async with http.post(
            f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "go"}
        ) as response:
            run_id = response.headers["X-Run-Id"]
            got = await asyncio.wait_for(read_events(response, 45), 30)
            status, written, body = await resume_shop_run(http, b.url, run_id, 0)
            assert status == 200, (status, body)
            assert error_code(written[-1]) == "run_over_budget", written[-1][:200]
            cut_at = len(written) - 1
            # Past one window (3 s) plus a heartbeat, the browser on A reading on.
            began = time.monotonic()
            while time.monotonic() - began < 4.5:
                got += await asyncio.wait_for(read_events(response, 5), 10)
            assert not upstream.cancelled.is_set() and not upstream.finished.is_set()
            resumed, events, resume_body = await resume_shop_run(http, b.url, run_id, len(got))
            stop_status, stop_body = await stop_shop_run(http, b.url, run_id)
            with_b = await _stopped_within(upstream, 5.0)
            if not with_b:
                assert (await stop_shop_run(http, a.url, run_id))[0] == 202
                assert await _stopped_within(upstream, 5.0)
        print(
            f"cut at {cut_at}, {len(got)} read on A; resume on B: {resumed} "
            f"{resume_body[:80]!r}; stop on B: {stop_status} {stop_body[:80]!r}; "
            f"upstream cancelled by it: {with_b}"
        )
        assert stop_status == 202 and with_b, (stop_status, stop_body)
        assert resumed == 200 and events, (resumed, resume_body)
        assert error_code(events[-1]) == "run_over_budget"


async def test_a_cut_run_that_finished_answers_stop_elsewhere_with_ended(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: a ~700 KB run of a 256 KiB budget is cut and then finishes (`event: done`,
    read whole by its browser on A). Its meta keeps `end = run_over_budget` (nothing records
    the real end of a cut run). A stop sent to B, as for any ended run, should answer 202
    `{"state": "ended"}`; since the fix making `stop_run` set the flag on a cut run, B
    answers `stopping` for a run that ended long ago (a UI waiting for it to stop, or
    retrying), and writes the flag into Redis each time. Held alongside: a resume on B past
    the cut still gets the cut's error. Fix (app/runs/runs.py, end of a cut run): record the
    run's real end on the cut run's meta (e.g. a field `f` = finished, one `HSET` with the
    meta's TTL unchanged), and have `stop_run` answer `ended` when it is set (or when the
    heartbeat key `h` has expired).
    Fixed (session 8): a cut run's end where it ran is recorded on its meta (`f`,
    `MARK_FINISHED`) and `stop_run` answers `ended` for it."""
    upstream = PaddedUpstream()
    async with two_shop_gateways(tmp_path, redis, upstream, window=30) as (a, b, http):
        async with http.post(
            f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "go"}
        ) as response:
            run_id = response.headers["X-Run-Id"]
            first = await asyncio.wait_for(read_events(response), 30)
        assert upstream.finished.is_set()
        status, written, body = await resume_shop_run(http, b.url, run_id, 0)
        assert status == 200, (status, body)
        assert error_code(written[-1]) == "run_over_budget"
        await asyncio.sleep(1.0)  # several heartbeats after the end
        resumed, past, _ = await resume_shop_run(http, b.url, run_id, len(first))
        assert resumed == 200 and len(past) == 1, (resumed, past)
        assert error_code(past[0]) == "run_over_budget"
        on_a = await stop_shop_run(http, a.url, run_id)
        on_b = await stop_shop_run(http, b.url, run_id)
        print(f"{len(first)} events, cut at {len(written) - 1}; stop A {on_a}, B {on_b}")
        assert on_b[0] == 202
        assert json.loads(on_b[1])["run"]["state"] == "ended", (on_a, on_b)


class _FlakyStore:
    """What `BudgetLedger` asks of a run store: 400 KB counted (near a 1 MB budget), every
    reservation admitted, `budget_publish` failing `failures` times; `flights`: each flight
    this replica published (reservations included), in order."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.flights: list[int] = []

    async def budget_used(self, app_id: str, *, window_ms: int) -> int:
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
        self.flights.append(publish)
        return True, 400_000

    async def budget_publish(
        self, app_id: str, flight: int, *, window_ms: int, ttl_ms: int
    ) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("redis blip")
        self.flights.append(flight)

    async def budget_add(self, app_id: str, cost: int, *, window_ms: int) -> None:
        return None


async def test_a_failed_flight_refresh_does_not_withdraw_the_runs_still_in_flight() -> None:
    """Attack: near its budget a replica publishes what its runs of the application hold
    (`reserve_growth`/`admit`: `local + headroom`), and `_refresh_flight` now re-sends the
    published value unchanged (attack-12's fix). One refresh fails (a Redis blip):
    `_send_flight` sets `_published = -1` ("any change publishes again") and still schedules
    the next refresh, which re-sends `_published` unchanged: -1, which PUBLISH_FLIGHT takes
    for "none" (HDEL). An agent run that is thinking (no events for a while) then holds its
    ~100 KB in Redis invisible to every other replica's admission and growth check: they may
    fill the budget again on top of it. Before the fix the refresh re-sent `local + headroom`.
    Expected: while this replica's runs hold anything, every flight it sends covers them
    (a failed publish retried with the last good value, never -1). Fix (app/runs/budget.py
    `_refresh_flight`): when `_published` is -1, re-send the last value that succeeded (keep
    it apart from the -1 marker), or `local + headroom` through `budget_reserve`.
    Fixed (session 8): a refresh re-sends the last value Redis accepted
    (`BudgetLedger._confirmed`), never the failure marker."""
    uncounted = UncountedCosts()
    ledger = BudgetLedger(refresh=60.0, uncounted=uncounted, flight_ttl_ms=300)
    store = _FlakyStore(failures=1)
    redis_store = cast(RedisRunStore, store)
    uncounted.add("shop", 100_000)  # a run here, not ended: 100 KB in Redis, uncounted
    admission = await ledger.admit(redis_store, "shop", window_ms=60_000, budget=1_000_000)
    assert admission.admitted
    assert store.flights and store.flights[0] >= 100_000, store.flights
    await asyncio.sleep(0.6)  # refreshes every 100 ms: the first fails, the next ones...
    held = uncounted.get("shop")
    sent = list(store.flights)
    await ledger.close()
    print(f"runs here hold {held} B; flights sent: {sent}")
    assert len(sent) > 1, sent
    assert all(flight >= held for flight in sent), sent


async def test_near_the_budget_small_batches_cost_a_round_trip_per_headroom_not_per_batch() -> None:
    """Attack: near its budget every batch a run outgrows what was published costs a Redis
    round trip (`reserve_growth`); a hostile upstream trickling 200 batches of 1000 bytes
    would, if each one asked Redis, make the app's pumps a Redis load. Held: one
    `budget_reserve` per headroom of growth (`local + headroom` published each time): at most
    200 KB / headroom + 2 round trips, no refresh adding unchecked growth."""
    uncounted = UncountedCosts()
    ledger = BudgetLedger(refresh=60.0, uncounted=uncounted, flight_ttl_ms=60_000)
    store = _FlakyStore(failures=0)
    redis_store = cast(RedisRunStore, store)
    uncounted.add("shop", 100_000)
    assert (await ledger.admit(redis_store, "shop", window_ms=60_000, budget=1_000_000)).admitted
    reserves_before = len(store.flights)
    asked = 0
    for _ in range(200):
        uncounted.add("shop", 1000)
        may = ledger.may_write("shop")
        if may is None:
            asked += 1
            may = await ledger.reserve_growth(redis_store, "shop")
        assert may
    headroom = store.flights[0] - 100_000
    await ledger.close()
    print(f"headroom {headroom} B: {asked} round trips for 200 batches of 1000 B")
    assert len(store.flights) - reserves_before >= asked
    assert asked <= 200_000 // headroom + 2, (asked, headroom)
    assert all(flight >= 100_000 for flight in store.flights if flight > 0)
