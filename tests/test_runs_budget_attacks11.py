"""Eleventh attack on resumable runs (branch attack-14, on main at ac86c82): the fixes of
session 8 for attack-13's findings -- a cut run's tick keeps its meta alive
(`store.tick(keys=False)`), a cut run's real end is recorded on its meta (`MARK_FINISHED`,
`RunMeta.finished`), a failed flight publish's refresh re-sends what Redis accepted
(`BudgetLedger._confirmed`) -- and the paused-replica tombstone (`<replica>:d`, `_TAKE_BACK`).

Findings (strict xfails when found, all fixed since; each test's docstring has its figures):
- the tombstone is taken back from the current counter, not the slot its runs went to: one
  slot later another replica's ended run counts 10 KB of 50 KB (0.56x of what is held);
- the tombstone lives as long as the flight hash (a field's TTL plus one window), not two
  windows: a replica paused 1.3 windows comes back counted twice (1.83x);
- a failed shrink publish makes every refresh re-send the old, larger `_confirmed`: a run
  counted at its end stays in flight too while the other runs are quiet (200 KB twice);
- a refresh that lands after a growth's reservation (a retried command) overwrites it, and
  `_confirmed` follows the replies, not Redis: a 500 KB run published as 162.5 KB (1.34x);
- a cut run pumping past its window: a resume elsewhere from before (or at) the cut gets 200
  with no event at all (its events expired, its meta kept): EventSource reconnects for ever;
- a cut whose record failed (`END_RUN`) is never retried: a reader elsewhere gets the
  written events, then nothing and no end while the run pumps;
- a cut run's `MARK_FINISHED` that failed is never retried: stops elsewhere answer
  `stopping` for the rest of its meta's life.
Held (plain tests): a paused replica back in the same slot counted once, a replica paused
twice, flapping publishes never sending less than the runs hold, a cut run finished past its
window answering `ended` elsewhere, a cut run whose replica was SIGKILLed told apart on B.

Harnesses: two `RedisRunStore`s on a redis-server of the test's own play two replicas (the
budget scripts); a fake store drives `BudgetLedger` (failures on chosen calls); two real
gateway processes share a redis-server of their own for the cut-run attacks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
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
    STORES_FLIGHT_KEY,
    PaddedUpstream,
    at_slot_offset,
    error_code,
    flight_fields,
    read_events,
    redis_at,
    resume_shop_run,
    run_stores,
    start_upstreams,
    stop_shop_run,
    two_shop_gateways,
    until_slot,
)

pytestmark = pytest.mark.redis_server

KIB = 1024
BUDGET = 256 * KIB
FLIGHT_KEY = STORES_FLIGHT_KEY


@pytest.fixture
def redis(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("256mb", "noeviction") as server:
        yield server


# -- two replicas' run stores on one redis-server --------------------------------------------


def _counters(redis: RedisServer) -> dict[int, int]:
    client = redis.client()
    out: dict[int, int] = {}
    for key in client.scan_iter(match=b"t:runs:{shop}:bytes:*", count=1000):
        out[int(key.rsplit(b":", 1)[1])] = int(client.get(key) or 0)
    return out


async def test_a_paused_replica_coming_back_in_the_next_slot_takes_its_runs_back_once(
    tier_integration: None, redis: RedisServer
) -> None:
    """Attack: replica A publishes 40 KB of runs in flight, is paused past its field's TTL
    and taken for dead by B's check (40 KB into the current slot's counter, a tombstone),
    while B's runs go on; A comes back within the same slot and publishes again. Held: what
    every check reads is B's ended runs plus A's runs in flight, once (the tombstone taken
    back from the slot it was added to, and gone)."""
    window = 2000
    async with run_stores(redis, 2) as (a, b):
        await at_slot_offset(window, 100)
        await a.budget_publish("shop", 40_000, window_ms=window, ttl_ms=100)
        await asyncio.sleep(0.2)
        assert await b.budget_used("shop", window_ms=window) == 40_000  # taken for dead
        await b.budget_add("shop", 50_000, window_ms=window)
        assert await b.budget_used("shop", window_ms=window) == 90_000
        await a.budget_publish("shop", 40_000, window_ms=window, ttl_ms=10_000)  # back
        used = await b.budget_used("shop", window_ms=window)
        flight = flight_fields(redis)
        print(f"after A came back: B reads {used}; counters {_counters(redis)}; {flight}")
        assert used == 90_000
        assert not any(field.endswith(b":d") for field in flight), flight


async def test_a_tombstone_taken_back_in_the_next_slot_does_not_uncount_other_runs(
    tier_integration: None, redis: RedisServer
) -> None:
    """Attack: A (40 KB in flight) is paused late in slot s past its field's TTL; B's check
    takes it for dead: 40 KB go into slot s's counter, a tombstone remembers them. In slot
    s+1 a run of B ends (50 KB, counted in slot s+1: kept in Redis one window, so counted
    until the end of slot s+2), then A comes back and publishes: `_TAKE_BACK` takes 40 KB
    from KEYS[1] first -- slot s+1's counter, B's run -- not from slot s where they went.
    Within slot s+1 the sum is right; in slot s+2 slot s drops out (with A's 40 KB, as it
    should) but slot s+1 still lacks 40 KB: B's run, ~100 % in Redis, counts 10 KB, and
    checks admit 40 KB more than the budget allows (with A's runs near the budget: up to
    ~1.8x it). Expected: in slot s+2, B's 50 KB plus A's 40 KB in flight.
    Fix (app/runs/scripts.py): keep the tombstone's slot with it (`<replica>:d` as
    `<slot>:<bytes>` or the counter key) and take back only from that counter (nothing when
    it is no longer current or previous)."""
    window = 1000
    async with run_stores(redis, 2) as (a, b):
        slot = await at_slot_offset(window, 700)
        await a.budget_publish("shop", 40_000, window_ms=window, ttl_ms=100)
        await asyncio.sleep(0.15)
        assert await b.budget_used("shop", window_ms=window) == 40_000  # dead, in slot s
        await until_slot(window, slot + 1, 100)
        await b.budget_add("shop", 50_000, window_ms=window)  # B's run ends in slot s+1
        await a.budget_publish("shop", 40_000, window_ms=window, ttl_ms=10_000)  # A back
        within = await b.budget_used("shop", window_ms=window)
        counters = _counters(redis)
        await until_slot(window, slot + 2, 100)
        later = await b.budget_used("shop", window_ms=window)
        held = 50_000 + 40_000  # B's ended run (in its window) + A's runs in flight
        print(
            f"slot s+1: reads {within} (counters {counters}); slot s+2: reads {later}, "
            f"held {held}: {later / held:.2f}x; B's run counts {later - 40_000} of 50000"
        )
        assert within == held
        assert later >= held, (later, held)


async def test_a_tombstone_lasts_its_two_windows(
    tier_integration: None, redis: RedisServer
) -> None:
    """Attack: A publishes 50 KB of runs in flight (the flight hash: the field's TTL plus one
    window), is paused past its field's TTL, B's check counts it dead (50 KB into the
    counter, which keeps them two windows; the tombstone `<A>:d` "for two windows"). Nobody
    else publishes, so nothing extends the hash: it expires one window after A's last publish
    with the tombstone in it. A comes back 1.3 windows after its pause (within the tombstone's
    two windows) and publishes 60 KB: nothing to take back, so its runs count as dead 50 KB
    and in flight 60 KB. Expected: 60 KB. Fix (app/runs/scripts.py `_READ_BUDGET`): when a
    replica is taken for dead, extend the hash to the tombstone's life (PEXPIRE to at least
    two windows), or keep tombstones in a key of their own with that TTL."""
    window = 2000
    async with run_stores(redis, 2) as (a, b):
        slot = await at_slot_offset(window, 60)
        await a.budget_publish("shop", 50_000, window_ms=window, ttl_ms=100)
        await asyncio.sleep(0.2)
        assert await b.budget_used("shop", window_ms=window) == 50_000  # dead
        client = redis.client()
        tomb = client.hget(FLIGHT_KEY, f"{a.replica}:d")
        await until_slot(window, slot + 1, 600)  # 1.3 windows after the pause
        gone = client.hget(FLIGHT_KEY, f"{a.replica}:d")
        await a.budget_publish("shop", 60_000, window_ms=window, ttl_ms=10_000)
        used = await b.budget_used("shop", window_ms=window)
        print(
            f"tombstone after the death {tomb!r}, 1.3 windows later {gone!r}; A back with "
            f"60000 in flight: B reads {used} ({used / 60_000:.2f}x)"
        )
        assert tomb == b"50000"
        assert used == 60_000, used


async def test_a_replica_paused_twice_is_counted_once_each_time(
    tier_integration: None, redis: RedisServer
) -> None:
    """Attack: A paused twice in one slot (dead, back, dead again, back by a count of its
    ended runs rather than a publish), B publishing runs of its own, paused too and back.
    Held: after each comeback, what is counted is each replica's runs once; no tombstone
    left over."""
    window = 2000
    async with run_stores(redis, 2) as (a, b):
        await at_slot_offset(window, 100)
        await b.budget_publish("shop", 7000, window_ms=window, ttl_ms=100)
        await a.budget_publish("shop", 5000, window_ms=window, ttl_ms=100)
        await asyncio.sleep(0.2)
        # Both taken for dead by A's own read (its own field too).
        first = await a.budget_used("shop", window_ms=window)
        assert sum(_counters(redis).values()) == 12_000
        await a.budget_publish("shop", 5000, window_ms=window, ttl_ms=100)
        await b.budget_publish("shop", 7000, window_ms=window, ttl_ms=10_000)
        back = await b.budget_used("shop", window_ms=window)
        await asyncio.sleep(0.2)
        again = await b.budget_used("shop", window_ms=window)  # A dead again
        await a.budget_add("shop", 5000, window_ms=window)  # its run ended: counted
        end = await b.budget_used("shop", window_ms=window)
        flight = flight_fields(redis)
        print(f"reads: {first} {back} {again} {end}; counters {_counters(redis)}; {flight}")
        # A's own view leaves out its own tombstone (it counts its runs itself, session 9):
        # B's 7000; the counter holds both (12000) for the others.
        assert first == 7_000
        assert back == 5000
        assert again == 5000
        assert end == 5000
        assert not any(field.endswith(b":d") for field in flight), flight


# -- the ledger's flight publishes, on a fake store ------------------------------------------


class _ScriptedStore:
    """What `BudgetLedger` asks of a run store: `used` counted (near a 1 MB budget), every
    reservation admitted, `budget_publish` failing on the publishes whose index (0-based, of
    `budget_publish` calls) is in `fail`; `flights`: (kind, bytes) of each flight sent that
    Redis would hold (reservations and publishes), in order; `added`: costs counted."""

    def __init__(self, fail: set[int], used: int = 400_000) -> None:
        self.fail = fail
        self.used = used
        self.publishes = 0
        self.flights: list[tuple[str, int]] = []
        self.added = 0

    async def budget_used(self, app_id: str, *, window_ms: int) -> int:
        return self.used + self.added

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
        self.flights.append(("reserve", publish))
        return True, self.used + self.added

    async def budget_publish(
        self, app_id: str, flight: int, *, window_ms: int, ttl_ms: int
    ) -> None:
        index = self.publishes
        self.publishes += 1
        await asyncio.sleep(0)
        if index in self.fail:
            raise StoreUnavailable("redis blip")
        self.flights.append(("publish", flight))

    async def budget_add(self, app_id: str, cost: int, *, window_ms: int) -> None:
        self.added += cost


async def test_a_failed_shrink_publish_does_not_keep_ended_runs_in_flight() -> None:
    """Attack: near a 1 MB budget a replica has two runs: a 200 KB one that ends and a 10 KB
    agent run that then thinks (no events) for minutes. The end is counted (`budget_add`),
    then `note` shrinks the published flight to `local + headroom` (72.5 KB) -- that one
    publish fails (a Redis blip). `_send_flight` keeps `_confirmed` (272.5 KB, from before
    the end) and the refresh re-sends it; once accepted it is `_confirmed` again, re-sent by
    every refresh: nothing calls `note` while the quiet run is quiet. The ended 200 KB count
    twice (counter + flight) on every replica's checks for as long as the run stays quiet
    (under-admission: runs refused although the budget has 200 KB free). Expected: after the
    failure, the flights sent settle at what the runs hold plus at most twice the headroom
    (`note`'s own rule). Fix (app/runs/budget.py `_refresh_flight`): re-send
    `min(_confirmed, local + headroom)` (a shrink needs no check), or call `note` after a
    failed publish instead of re-sending the stale value."""
    uncounted = UncountedCosts()
    ledger = BudgetLedger(refresh=60.0, uncounted=uncounted, flight_ttl_ms=300)
    store = _ScriptedStore(fail={0})  # the first publish: the shrink after the end
    redis_store = cast(RedisRunStore, store)
    uncounted.add("shop", 210_000)  # the two runs, not ended
    admission = await ledger.admit(redis_store, "shop", window_ms=60_000, budget=1_000_000)
    assert admission.admitted
    ((_, first),) = store.flights
    headroom = first - 210_000
    # The big run ends: its cost handed to the ledger, then out of `uncounted` (`_end`).
    ledger.add(redis_store, "shop", 200_000, window_ms=60_000, keep=60.0)
    uncounted.add("shop", -200_000)
    ledger.note("shop")
    await asyncio.sleep(1.0)  # flush, the failed shrink, ~10 refreshes of a 300 ms TTL
    sent = list(store.flights)
    await ledger.close()
    local = uncounted.get("shop")
    settled = [flight for _, flight in sent[-3:]]
    print(
        f"headroom {headroom}; counted {store.added}; the quiet run holds {local}; flights "
        f"sent: {sent[:4]} ... last {settled} (double-counted {settled[-1] - local - headroom})"
    )
    assert store.added == 200_000
    assert all(0 < flight <= local + 2 * headroom for flight in settled), settled


async def test_failed_refreshes_never_send_less_than_the_runs_hold() -> None:
    """Attack: every other flight publish fails (a flapping Redis) while a run near the
    budget grows through `reserve_growth` and its refreshes go on. Held: each flight that
    reaches Redis covers what this replica's runs hold at that moment (no -1, no 0, no
    stale smaller value after a growth), and `close` leaves exactly what the run (not ended)
    holds, no headroom (attack-17: its field then expires and counts as a dead replica's)."""
    uncounted = UncountedCosts()
    ledger = BudgetLedger(refresh=60.0, uncounted=uncounted, flight_ttl_ms=150)
    store = _ScriptedStore(fail={i for i in range(0, 200, 2)})
    redis_store = cast(RedisRunStore, store)
    uncounted.add("shop", 100_000)
    assert (await ledger.admit(redis_store, "shop", window_ms=60_000, budget=1_000_000)).admitted
    low: list[tuple[int, int]] = []
    for _ in range(20):
        uncounted.add("shop", 20_000)
        held = uncounted.get("shop")
        may = ledger.may_write("shop")
        if may is None:
            may = await ledger.reserve_growth(redis_store, "shop")
        assert may
        before = len(store.flights)
        await asyncio.sleep(0.07)
        low += [(f, held) for _, f in store.flights[before:] if f < held]
    sent = len(store.flights)
    store.fail = set()  # (a failed withdrawal at close is logged, best effort)
    await ledger.close()
    print(f"{sent} flights sent, {store.publishes} publishes tried; below what was held: {low}")
    assert sent > 20
    assert not low, low
    assert store.flights[-1] == ("publish", uncounted.get("shop"))


# -- cut runs on two gateway processes -------------------------------------------------------


async def test_a_resume_elsewhere_from_before_the_cut_past_the_window_is_told_why(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: a run of a 3 s window is cut over its 256 KiB budget and streams on for ~40 s
    to its browser on A. Session 8's fix keeps the cut run's meta alive (`tick(keys=False)`
    refreshes `m`), but what it wrote (`e`, `z`) expires one window after the cut. A second
    tab (or a browser that lost its Last-Event-ID) resumes on B from 0, or from an event
    before the cut, once that window has passed: the meta says ended at the cut, so B reads
    the stream (`follow_remote`, no follower): nothing, and answers 200 with no event at all
    and the end of the stream -- which EventSource takes as "reconnect", for ever, each time
    the same empty answer (before the fix: 404). Expected: an answer that says why (the
    cut's `event: error` `run_over_budget`, or `resume_too_old`). Fix (app/runs/http.py
    `resume_run`): for a cut run whose events are gone (an empty first read), answer the cut's
    error (`_cut_answer`); or `follow_remote`: an ended run whose first read is empty while
    `after < replay_until` gets `resume_too_old`."""
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
            began = time.monotonic()
            while time.monotonic() - began < 4.5:  # past the window + a heartbeat
                got += await asyncio.wait_for(read_events(response, 5), 10)
            assert not upstream.cancelled.is_set() and not upstream.finished.is_set()
            answers = [await resume_shop_run(http, b.url, run_id, after) for after in (0, 3)]
            at_cut = await resume_shop_run(http, b.url, run_id, cut_at)
            stopped = await stop_shop_run(http, b.url, run_id)
            await asyncio.wait_for(upstream.cancelled.wait(), 5)
        print(
            f"cut at {cut_at}, {len(got)} read on A; resumes on B from 0 and 3: "
            f"{[(s, len(e), body[:60]) for s, e, body in answers]}; from the cut: "
            f"{at_cut[0]} {[error_code(e) for e in at_cut[1]]}; stop on B {stopped}"
        )
        assert stopped[0] == 202
        for status, events, body in [*answers, at_cut]:
            assert status != 500, body
            assert events, (status, body)
            assert error_code(events[-1]) in {"run_over_budget", "resume_too_old"}


async def test_a_cut_run_that_finished_past_its_window_answers_stop_elsewhere_ended(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: a cut run of a 2 s window pumps on A ~4 s past its cut (its events in Redis
    expired, its meta kept by its ticks), then finishes. Held: a stop on B answers 202
    `ended` (`MARK_FINISHED` on the kept meta) and writes no stop flag; a resume on B past
    the cut gets the cut's error; no 404 while the meta lives."""
    upstream = PaddedUpstream(delay=0.05, count=120)
    async with two_shop_gateways(tmp_path, redis, upstream, window=2) as (a, b, http):
        async with http.post(
            f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "go"}
        ) as response:
            run_id = response.headers["X-Run-Id"]
            got = await asyncio.wait_for(read_events(response), 30)
        assert upstream.finished.is_set()
        await asyncio.sleep(0.5)  # a couple of heartbeats after the end
        on_b = await stop_shop_run(http, b.url, run_id)
        resumed, past, body = await resume_shop_run(http, b.url, run_id, len(got) - 1)
        client = redis.client()
        metas = [k for k in client.scan_iter(match=f"*run:{{{run_id}}}:m".encode())]
        fields = client.hgetall(metas[0]) if metas else {}
        print(
            f"{len(got)} events on A; stop on B {on_b}; resume on B past the cut "
            f"{resumed} {[error_code(e) for e in past]} {body[:60]!r}; meta {fields}"
        )
        assert on_b[0] == 202 and json.loads(on_b[1])["run"]["state"] == "ended", on_b
        assert fields.get(b"f") == b"1" and b"stop" not in fields, fields
        assert resumed == 200 and error_code(past[-1]) == "run_over_budget"


async def _read_for(response: aiohttp.ClientResponse, seconds: float) -> tuple[list[bytes], bool]:
    """The events `response` sends within `seconds`; whether it ended meanwhile."""
    events: list[bytes] = []
    buffer = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return events, False
        try:
            chunk = await asyncio.wait_for(response.content.readany(), left)
        except TimeoutError:
            return events, False
        if not chunk:
            return events, True
        buffer += chunk
        *complete, buffer = buffer.split(b"\n\n")
        events.extend(e for e in complete if e and not e.startswith(b":"))


async def test_a_cut_not_recorded_is_learnt_by_readers_elsewhere(
    tier_system: None, monkeypatch: pytest.MonkeyPatch, redis: RedisServer
) -> None:
    """Attack: Redis fails exactly when a run's growth takes its application over its budget:
    `_stop_keeping`'s `store.end` (the cut's `event: error` and end) raises `StoreUnavailable`
    once (a blip), which is logged and not retried. The run goes on on A, not kept: it ticks
    with `keys=False` (its heartbeat alive, its meta kept) but never writes again. Its meta has
    no end, so a resume on B follows it as a live run: the follower sees the heartbeat, no new
    entry, no end -- keep-alives only, for as long as the run pumps on A (minutes for an agent),
    then `run_orphaned` once it ends there (its end is not recorded either: `_record_end` only
    marks `f`, which `meta` ignores without `x`). Expected: within a few heartbeats of the cut,
    a reader elsewhere learns the run was cut (`run_over_budget`). Fix (app/runs/runs.py): keep
    the cut's record pending and retry it with each tick of the cut run (`tick` fails the same
    way while Redis is down), and record the real end of a cut whose record failed with
    `END_RUN` (`x` = `run_over_budget`)."""
    from app.keys import RUNS_KEY
    from app.runs.run import CUT_REASON
    from tests.fake_upstream import app_settings, run_gateway

    upstream = PaddedUpstream(delay=0.1, count=150)
    async with AsyncExitStack() as stack:
        (upstream_url,) = await start_upstreams(stack, upstream.app())
        env = {
            "SESSION_STORE": "redis",
            "REDIS_URL": redis.url,
            "RUN_HEARTBEAT_SECONDS": "0.25",
        }
        settings = app_settings(
            upstream_url,
            env,
            resumable=True,
            resume_window_seconds=30,
            resume_redis_budget_bytes=BUDGET,
        )
        a = await stack.enter_async_context(run_gateway(settings))
        b = await stack.enter_async_context(run_gateway(settings))
        store = a.app[RUNS_KEY].store
        assert store is not None
        real_end = store.end
        failed: list[str] = []

        async def end(run_id: str, *args: object, reason: str, **kwargs: object) -> None:
            if reason == CUT_REASON and not failed:  # a blip: the cut's first record fails
                failed.append(run_id)
                raise StoreUnavailable("ConnectionError: redis blip at the cut")
            await real_end(run_id, *args, reason=reason, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "end", end)
        http = await stack.enter_async_context(
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        )
        async with http.post(
            f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "go"}
        ) as response:
            run_id = response.headers["X-Run-Id"]
            got = await asyncio.wait_for(read_events(response, 45), 30)
            assert failed == [run_id], failed  # the cut happened, its record failed
            async with http.get(
                f"{b.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "0"}
            ) as resumed:
                status = resumed.status
                events, ended = await _read_for(resumed, 8.0)
            live = not upstream.finished.is_set() and not upstream.cancelled.is_set()
            stopped = await stop_shop_run(http, str(b.url), run_id)
            await asyncio.wait_for(upstream.cancelled.wait(), 5)
        codes = [error_code(e) for e in events if error_code(e)]
        print(
            f"cut after ~{len(got)} events on A, its record failed; resume on B for 8 s: "
            f"{status}, {len(events)} events, errors {codes}, ended {ended}; run still "
            f"pumping on A: {live}; stop on B {stopped}"
        )
        assert live and status == 200
        assert ended and codes == ["run_over_budget"], (len(events), codes, ended)


class _LateStore(_ScriptedStore):
    """A `_ScriptedStore` whose first `budget_publish` reaches Redis `late` seconds after it
    was sent (a command retried after a dropped connection: another task's command sent
    meanwhile goes first); `sent`: set when that publish was sent."""

    def __init__(self, late: float) -> None:
        super().__init__(fail=set())
        self.late = late
        self.sent = asyncio.Event()

    async def budget_publish(
        self, app_id: str, flight: int, *, window_ms: int, ttl_ms: int
    ) -> None:
        index = self.publishes
        self.publishes += 1
        if index == 0:
            self.sent.set()
            await asyncio.sleep(self.late)
        self.flights.append(("publish", flight))


async def test_a_refresh_landing_after_a_reservation_does_not_hide_the_growth() -> None:
    """Attack: near a 1 MB budget (400 KB counted) a run holds 100 KB, published 162.5 KB.
    Its refresh re-sends `_confirmed` (162.5 KB) and that command is slow to land (retried
    after a dropped connection). Meanwhile the run gets one 400 KB event: `reserve_growth`
    publishes 562.5 KB through `budget_reserve`, which lands first. Then the refresh lands:
    Redis holds 162.5 KB, and its reply sets `_confirmed` back to 162.5 KB, which every
    later refresh re-sends while the run thinks. Other replicas see 400 + 162.5 KB while
    900 KB are held: they may admit 437.5 KB more (1.34x the budget). Expected: once the
    publishes settle, what Redis holds covers what the run holds. Fix (app/runs/budget.py):
    a reservation waits for the publish under way (`_publishing[app_id]`) before it is sent,
    or each flight carries a sequence number so that `_confirmed` (and Redis, via the script)
    never goes back to an older value."""
    uncounted = UncountedCosts()
    ledger = BudgetLedger(refresh=60.0, uncounted=uncounted, flight_ttl_ms=300)
    store = _LateStore(late=0.05)
    redis_store = cast(RedisRunStore, store)
    uncounted.add("shop", 100_000)
    assert (await ledger.admit(redis_store, "shop", window_ms=60_000, budget=1_000_000)).admitted
    await asyncio.wait_for(store.sent.wait(), 2)  # the refresh is on its way
    uncounted.add("shop", 400_000)  # one big event
    assert ledger.may_write("shop") is None
    assert await ledger.reserve_growth(redis_store, "shop")
    await asyncio.sleep(0.6)  # the late refresh lands, then ~5 refreshes
    held = uncounted.get("shop")
    sent = list(store.flights)
    holds = sent[-1][1]
    await ledger.close()
    seen = store.used + holds
    print(
        f"flights in Redis's order: {sent}; the run holds {held}: Redis holds {holds}; "
        f"others see {seen} of {store.used + held} held, may admit "
        f"{1_000_000 - seen} more: {(store.used + held + 1_000_000 - seen) / 1_000_000:.2f}x"
    )
    assert holds >= held, (holds, held)


async def test_a_cut_run_whose_finish_was_not_recorded_answers_stop_elsewhere_ended(
    tier_system: None, monkeypatch: pytest.MonkeyPatch, redis: RedisServer
) -> None:
    """Attack: a ~700 KB run of a 256 KiB budget is cut, then finishes on A while Redis
    blips: `mark_finished` raises `StoreUnavailable`, logged, never retried. Its meta keeps
    `run_over_budget` without `f` for one window after its last tick, its heartbeat key
    expires 4 heartbeats after the end. A stop on B (the UI's stop button, retried) answers
    `stopping` and writes the stop flag each time, for a run that ended seconds ago (A says
    `ended`). Expected: `ended` once the run ended where it ran. Fix (app/runs/http.py
    `stop_run`): for a cut run without `f`, answer `ended` when its heartbeat key `h` is gone
    (one `EXISTS`; also right for a cut run whose replica died), or retry `mark_finished`."""
    from app.keys import RUNS_KEY
    from tests.fake_upstream import app_settings, run_gateway

    upstream = PaddedUpstream()
    async with AsyncExitStack() as stack:
        (upstream_url,) = await start_upstreams(stack, upstream.app())
        env = {"SESSION_STORE": "redis", "REDIS_URL": redis.url, "RUN_HEARTBEAT_SECONDS": "0.25"}
        settings = app_settings(
            upstream_url,
            env,
            resumable=True,
            resume_window_seconds=30,
            resume_redis_budget_bytes=BUDGET,
        )
        a = await stack.enter_async_context(run_gateway(settings))
        b = await stack.enter_async_context(run_gateway(settings))
        store = a.app[RUNS_KEY].store
        assert store is not None
        failed: list[str] = []

        async def mark_finished(run_id: str) -> None:
            failed.append(run_id)
            raise StoreUnavailable("ConnectionError: redis blip at the end")

        monkeypatch.setattr(store, "mark_finished", mark_finished)
        http = await stack.enter_async_context(
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        )
        async with http.post(
            f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "go"}
        ) as response:
            run_id = response.headers["X-Run-Id"]
            got = await asyncio.wait_for(read_events(response), 30)
        assert upstream.finished.is_set()
        await asyncio.sleep(1.5)  # six heartbeats: its heartbeat key is gone
        on_a = await stop_shop_run(http, str(a.url), run_id)
        on_b = []
        for _ in range(3):
            on_b.append(await stop_shop_run(http, str(b.url), run_id))
            await asyncio.sleep(0.5)
        states = [json.loads(body)["run"]["state"] for _, body in on_b]
        print(f"{len(got)} events on A, finish not recorded ({failed}); A: {on_a}; B: {states}")
        assert failed == [run_id]
        assert all(status == 202 for status, _ in on_b)
        assert states == ["ended"] * 3, states


async def test_a_cut_run_whose_replica_died_is_still_told_apart_elsewhere(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: a run of a 256 KiB budget is cut while pumping on A; A is SIGKILLed mid-run
    (no end, no `f`, its ticks stop). Held on B, within the window: a resume past the cut
    gets the cut's error, a resume from 0 replays what was written then the cut's error (no
    hang on a run whose pumper is gone), a stop answers 202 (no 500, no 404)."""
    upstream = PaddedUpstream(delay=0.1, count=400)
    async with two_shop_gateways(tmp_path, redis, upstream, window=30) as (a, b, http):
        async with http.post(
            f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "go"}
        ) as response:
            run_id = response.headers["X-Run-Id"]
            got = await asyncio.wait_for(read_events(response, 40), 30)
            a.kill()
        await asyncio.sleep(1.5)  # its heartbeat key expires (4 heartbeats)
        past = await resume_shop_run(http, b.url, run_id, len(got))
        whole = await resume_shop_run(http, b.url, run_id, 0)
        stopped = await stop_shop_run(http, b.url, run_id)
    print(
        f"{len(got)} read on A before SIGKILL; on B: past the cut {past[0]} "
        f"{[error_code(e) for e in past[1]]}; from 0 {whole[0]}, {len(whole[1])} events, "
        f"last {error_code(whole[1][-1]) if whole[1] else None}; stop {stopped}"
    )
    assert past[0] == 200 and [error_code(e) for e in past[1]] == ["run_over_budget"]
    assert whole[0] == 200 and len(whole[1]) > 1
    assert error_code(whole[1][-1]) == "run_over_budget"
    assert all(error_code(e) is None for e in whole[1][:-1])
    assert stopped[0] == 202, stopped
