"""Eighth attack on resumable runs (branch attack-11, on main at aea5dfe): the runs in flight
published near an application's budget and the typical run cost a new run counts as from its
start (`BudgetLedger.admit/note`, `BUDGET_RESERVE`, `PUBLISH_FLIGHT`), a replica that stops or
pauses while its field is published, `SharedEntries`, the watched plain catch-up read, the
writer's byte-bounded backlog, and the session create's retry.

Findings (xfail strict, each with its measurements and a suggested fix): runs started
together are admitted as the application's typical run, which tiny runs drag down (0 on a
fresh replica): 3.9x the budget (browsers alternating tiny and huge runs back to back,
without coordination: 2.3-3.9x), and on a Redis sized for the budgets another application's
users lose their sessions and runs; a replica paused past its field's TTL is counted twice; a
replica once near the budget publishes a bare headroom for ever, so an application with a
small budget stays refused with nothing in Redis; a Redis stall between the `WATCH` and the
`GET` of a plain catch-up read comes out as an unretried `WatchError` (and the gate fails
every waiter with it). Held (plain tests): a killed replica's runs in flight count once and
leave no key for ever; a remote reader of a fast run gets each event once, in order, or an
explicit error; entries another session holds never reach a stranger; a retried session
create never takes another session's key.

Each test plays a hostile application owner (its upstream and its browsers) or client against
real gateway processes and a redis-server of its own, or drives the store directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any, cast
from unittest import mock

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from app.runs.store import RedisRunStore, RunMeta
from app.sessions.backend import StoreUnavailable
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import RedisOptions, make_client
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer
from tests.runs_helpers import (
    CSRF,
    CountingUpstream,
    SseUpstream,
    budget_counted,
    close_quietly,
    error_code,
    read_events,
    redis_at,
    redis_runs_env,
    start_upstreams,
)

pytestmark = pytest.mark.redis_server

MIB = 1024 * 1024
BUDGET = 16 * MIB


@pytest.fixture
def redis(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("512mb", "noeviction") as server:
        yield server


class TinyOrHugeUpstream(SseUpstream):
    """`message: tiny`: one 10-byte event. `message: huge`: once `together` huge requests
    arrived (or after `hold` seconds), one event of `size` bytes: runs that all start (and
    pass their budget check) before any of their events arrive."""

    def __init__(self, together: int, size: int = 4_100_000, hold: float = 5.0) -> None:
        self.together = together
        self.size = size
        self.hold = hold
        self.arrived = 0
        self.all_here = asyncio.Event()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        huge = (await request.json()).get("message") == "huge"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if huge:
            self.arrived += 1
            if self.arrived >= self.together:
                self.all_here.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_here.wait(), self.hold)
            await asyncio.sleep(0.2)  # the gateway has checked the budget of each
            await response.write(b"data: " + b"h" * self.size + b"\n\n")
        else:
            await response.write(b"data: tinytinyti\n\n")
        await response.write_eof()
        return response

    async def write_events(self, response: web.StreamResponse) -> None:
        raise NotImplementedError


async def _run(http: aiohttp.ClientSession, url: str, message: str) -> bool:
    """One `shop` run read to its end; whether it was resumable (kept in Redis)."""
    async with http.post(
        f"{url}/apps/shop/agent/chat", headers=CSRF, json={"message": message}
    ) as response:
        await response.read()
        assert response.status == 200, response.status
        return "X-Run-Id" in response.headers


def _shop_env(
    tmp_path: Path, redis: RedisServer, upstream: str, window: float = 30
) -> dict[str, str]:
    return redis_runs_env(
        tmp_path,
        redis.url,
        f'[apps.shop]\nupstream = "{upstream}"\nresumable = true\n'
        f"resume_window_seconds = {window}\nresume_redis_budget_bytes = {BUDGET}\n",
    )


async def _tiny_then_huge_together(
    tmp_path: Path, redis: RedisServer, *, replicas: int, tiny: int, huge: int
) -> tuple[int, int]:
    """On each of `replicas` gateways, `tiny` tiny runs one after the other (the
    application's typical run becomes tiny), then `huge` runs of one 4.1 MB event per
    replica started at once: (bytes Redis counts for `shop`, huge runs kept)."""
    upstream = TinyOrHugeUpstream(together=replicas * huge)
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, upstream.app())
        env = _shop_env(tmp_path, redis, url)
        with ExitStack() as processes:
            gateways = [processes.enter_context(GatewayProcess(env)) for _ in range(replicas)]
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                for gateway in gateways:
                    for _ in range(tiny):
                        assert await _run(http, gateway.url, "tiny")

            async def one(gateway_url: str) -> bool:
                jar = aiohttp.CookieJar(unsafe=True)
                async with aiohttp.ClientSession(cookie_jar=jar) as http:
                    return await _run(http, gateway_url, "huge")

            kept = await asyncio.wait_for(
                asyncio.gather(*(one(g.url) for g in gateways for _ in range(huge))), 40
            )
            await asyncio.sleep(1.0)  # the last costs flushed
            return budget_counted(redis, "shop"), sum(kept)


@pytest.mark.parametrize(
    ("replicas", "tiny", "huge"),
    [
        pytest.param(1, 24, 12, id="1-replica-24-tiny-then-12"),
        pytest.param(3, 0, 4, id="3-fresh-replicas-x4"),
    ],
)
async def test_runs_started_together_do_not_overrun_the_budget_whatever_the_typical_run(
    tier_system: None, tmp_path: Path, redis: RedisServer, replicas: int, tiny: int, huge: int
) -> None:
    """Attack: the application's owner ends 24 tiny runs (one 10-byte event: ~6.2 KiB of
    budget each) on a replica, so its typical run cost (the exponential average a new run
    counts as from its start, `BudgetLedger.admit`) is ~6 KiB -- or uses replicas that
    just started, where no typical run is known yet (0); then browsers start runs together
    (12 on one replica, or 4 on each of 3) whose upstream answers at once but sends its one
    4.1 MB event (~5.5 MB of budget) only after all of them started. Each budget check
    counts the others as ~6 KiB (or 0): all are admitted, and their events go to Redis
    whatever the budget says after. (Back-to-back runs of one size, attack-gate-9's flood,
    keep 1.17-1.26x: the typical run is honest there.)

    Measured (aea5dfe, 3 runs each): all 12 kept, Redis counts 62.6-63.1 MiB of 16 MiB
    (3.91-3.94x), redis-server used_memory ~49.5 MiB, in both shapes.
    Expected: at most ~1.5x the budget (the claim for 3 replicas). Fix
    (app/runs/budget.py `BudgetLedger.admit`, app/runs/runs.py `RunRegistry._note_cost`):
    near the budget count a new run from its start as what a run of the application may
    cost (`redis_cost(resume_max_bytes, ...)`, or the largest recent run, not an average
    that cheap runs drag down, and not 0 when none is known); or stop keeping a run (an end
    marker `over_budget`, no more `XADD`s) whose growth takes its application over its
    budget, the only bound that does not depend on guessing.
    Fixed (session 8): near the budget a run's growth is checked in Redis before it is
    written (`BudgetLedger.may_write`/`reserve_growth`) and a run that would take its
    application over it stops going to Redis (`RunRegistry._stop_keeping`, `event: error`
    `run_over_budget`): 0.67-0.99x (1 replica) and 0.98x (3 fresh replicas) in 3 runs each."""
    counted, kept = await _tiny_then_huge_together(
        tmp_path, redis, replicas=replicas, tiny=tiny, huge=huge
    )
    used_memory = int(redis.client().info("memory")["used_memory"])
    message = (
        f"{replicas} replica(s), {tiny} tiny runs each, then {huge} huge each together: kept "
        f"{kept} of {replicas * huge}; Redis counts {counted / MIB:.1f} MiB of "
        f"{BUDGET / MIB:.0f} MiB ({counted / BUDGET:.2f}x), used_memory {used_memory / MIB:.1f} MiB"
    )
    print(message)
    assert counted <= BUDGET * 1.5, message


class HeldAfterBigEvent(SseUpstream):
    """`message: hold`: one event of `size` bytes, then the stream stays open until `release`
    is set (at most `hold` seconds), then the end. Any other message: one tiny event."""

    def __init__(self, size: int = 4_100_000, hold: float = 30.0) -> None:
        self.size = size
        self.hold = hold
        self.release = asyncio.Event()
        self.sent = asyncio.Event()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        held = (await request.json()).get("message") == "hold"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if held:
            await response.write(b"data: " + b"h" * self.size + b"\n\n")
            self.sent.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.hold)
        else:
            await response.write(b"data: tinytinyti\n\n")
        await response.write_eof()
        return response

    async def write_events(self, response: web.StreamResponse) -> None:
        raise NotImplementedError


FLIGHT_KEY = "agent:aux:runs:{shop}:flight"


def _flight(redis: RedisServer) -> dict[str, int]:
    """`shop`'s runs in flight as published: replica -> bytes (the expiry fields and a
    tombstone's counter key left out)."""
    raw = cast(dict[bytes, bytes], redis.client().hgetall(FLIGHT_KEY))
    return {k.decode(): int(v) for k, v in raw.items() if not k.endswith((b":t", b":s"))}


async def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def _held_run(url: str, stack: AsyncExitStack) -> None:
    """A `shop` run on `url` whose browser stays (reading) until `stack` closes."""
    http = await stack.enter_async_context(
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    )
    response = await stack.enter_async_context(
        http.post(f"{url}/apps/shop/agent/chat", headers=CSRF, json={"message": "hold"})
    )
    assert response.status == 200 and "X-Run-Id" in response.headers

    async def drain() -> None:
        with contextlib.suppress(aiohttp.ClientError, asyncio.CancelledError):
            while await response.content.read(65536):
                pass

    task = asyncio.create_task(drain())
    stack.callback(task.cancel)


async def test_a_paused_replicas_runs_are_not_counted_twice(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: replica A pumps a run that holds one 4.1 MB event (~5.5 MB of budget: a
    third of it, so A publishes its runs in flight, ~5.8 MB with the headroom). A is paused
    (SIGSTOP: a frozen container or VM, a stalled event loop) for 2 s, longer than its
    field's TTL (4 heartbeats: 1 s here, 2 s by default); meanwhile a run starts on B, whose
    check counts A's field as a dead replica's ended runs (`INCRBY` of the counter, for two
    windows). A resumes: it publishes its runs again, and at their end counts them again.

    Expected: the application's runs counted once, about their cost plus one headroom (a
    replica seen dead that comes back should take back what was counted for it, e.g. a
    tombstone field `<replica>:dead` = the bytes counted, which its next publish (or its end
    count) deducts; app/runs/scripts.py `_READ_BUDGET`, `_PUBLISH_FLIGHT`).
    Fixed (session 8): a tombstone `<replica>:d` keeps what was counted as dead, and that
    replica's next publish or count takes it back (`_TAKE_BACK`, app/runs/scripts.py): 5.23
    MiB counted for the run (was 10.78-11.46)."""
    upstream = HeldAfterBigEvent()
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, upstream.app())
        env = _shop_env(tmp_path, redis, url, window=10)
        with ExitStack() as processes:
            a, b = (processes.enter_context(GatewayProcess(env)) for _ in range(2))
            async with AsyncExitStack() as runs:
                await _held_run(a.url, runs)
                await asyncio.wait_for(upstream.sent.wait(), 10)
                assert await _wait_for(lambda: bool(_flight(redis)), 5), "A never published"
                published = sum(_flight(redis).values())
                a.signal(signal.SIGSTOP)
                try:
                    await asyncio.sleep(1.6)  # past the field's TTL
                    async with aiohttp.ClientSession(
                        cookie_jar=aiohttp.CookieJar(unsafe=True)
                    ) as http:
                        await _run(http, b.url, "tiny")  # B's check reads the budget
                    reaped = budget_counted(redis, "shop")
                    await asyncio.sleep(0.4)
                finally:
                    a.signal(signal.SIGCONT)
                assert await _wait_for(lambda: bool(_flight(redis)), 5), "A never came back"
                upstream.release.set()
                await asyncio.sleep(1.5)  # A's run ended and was counted
            counted = budget_counted(redis, "shop") + sum(_flight(redis).values())
    message = (
        f"A published {published / MIB:.2f} MiB in flight; B's check counted "
        f"{reaped / MIB:.2f} MiB as a dead replica's; after A came back and its run ended, "
        f"Redis counts {counted / MIB:.2f} MiB for shop (one 4.1 MB run + 1 tiny)"
    )
    print(message)
    assert counted <= published + 64 * 1024, message


async def test_a_killed_replicas_runs_in_flight_count_once_and_leave_no_key_for_ever(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: replica A publishes a run in flight (one 4.1 MB event held open) and is
    SIGKILLed: its field is never withdrawn. Held (passing): B's checks count it once as
    ended runs (the field removed as they count it), every budget key of the application
    has a TTL, and all of them are gone within two windows (3 s here): no over-count (nor a
    field) for ever, and no other application's key touched."""
    upstream = HeldAfterBigEvent()
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, upstream.app())
        env = _shop_env(tmp_path, redis, url, window=3)
        with ExitStack() as processes:
            a, b = (processes.enter_context(GatewayProcess(env)) for _ in range(2))
            async with AsyncExitStack() as runs:
                await _held_run(a.url, runs)
                await asyncio.wait_for(upstream.sent.wait(), 10)
                assert await _wait_for(lambda: bool(_flight(redis)), 5), "A never published"
                published = sum(_flight(redis).values())
                a_field = set(_flight(redis))
                a.kill()
                await asyncio.sleep(1.2)  # past the field's TTL (4 heartbeats of 0.25 s)
                async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                    await _run(http, b.url, "tiny")
                    assert not a_field & set(_flight(redis))  # (B's own may be there now)
                    counted = budget_counted(redis, "shop")
                    assert published <= counted <= published + 64 * 1024, (published, counted)
                    await _run(http, b.url, "tiny")  # counted once, not per check
                    assert budget_counted(redis, "shop") - counted < 64 * 1024
                client = redis.client()
                keys = list(client.scan_iter(match=b"*runs:{shop}*", count=1000))
                assert keys and all(client.pttl(key) > 0 for key in keys), keys
                # The counters go with their TTL (two windows); the field of A never comes
                # back. (B's own field stays: the next test.)
                assert await _wait_for(lambda: budget_counted(redis, "shop") == 0, 8)
                assert not a_field & set(_flight(redis))
                upstream.release.set()


class SizedUpstream(SseUpstream):
    """One event of as many bytes as the message says."""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        size = int((await request.json()).get("message"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + b"s" * size + b"\n\n")
        await response.write_eof()
        return response

    async def write_events(self, response: web.StreamResponse) -> None:
        raise NotImplementedError


async def _sized_run(url: str, size: int) -> bool:
    """A `shop` run of one `size`-byte event from a new browser; whether it was kept."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        return await _run(http, url, str(size))


async def test_an_application_once_near_its_budget_is_not_over_it_for_ever(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: any client of an application with a small budget (600 KiB, window 2 s, 3
    replicas) sends one message whose answer is 200 KB (~273 KB of budget: past a quarter of
    it) to each replica. Each replica is then near the budget and publishes its runs in
    flight plus `FLIGHT_HEADROOM_BYTES` (355,829 B); its refresh timer publishes that again
    every third of the field's TTL while the application is in `_near`, which only a check
    (or a cost change) on that replica re-evaluates. Nothing starts on them: the fields stay,
    each replica's checks count the others' (2 x 355,829 B = 711,658 B > 600 KiB), so every
    run is refused, with nothing at all in Redis, for as long as the replicas live.

    Measured (aea5dfe, 4 runs): the first replica's field (355,829 B) was still there 4.5 s
    (2 windows) after the counters reached 0, and 12 s (6 windows) in a longer probe with 2
    replicas (both fields); then a 10-byte run on each replica: kept [True, False, False]
    (the first does not count its own field; its tiny run's reservation, the typical run,
    also stays in its field until the next refresh: 628,818 B), 3 s later [True, True,
    False]. The first 200 KB runs on replicas 2 and 3 were refused already (the first's
    field, 628,818 B, plus the 272,989 B counted: 901,807 B). Each idle replica also sends
    a PUBLISH_FLIGHT every third of the field's TTL (0.67 s by default) per application.
    Expected: once the application's runs are gone from Redis, nothing counts for it and
    every replica admits. Fix (app/runs/budget.py `BudgetLedger._refresh_flight` /
    `note`): withdraw the field (publish 0) when this replica holds nothing uncounted of
    the application (`_local` == 0) instead of publishing the bare headroom, and let the
    refresh re-read the budget (`_near` re-evaluated) rather than trust a stale nearness.
    Fixed (session 8): the refresh withdraws the field once nothing is uncounted here, and
    the headroom is at most a sixteenth of the budget: no field left, 10-byte runs kept
    [True, True, True] (2 runs)."""
    budget = 600 * 1024
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, SizedUpstream().app())
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{url}"\nresumable = true\n'
            f"resume_window_seconds = 2\nresume_redis_budget_bytes = {budget}\n",
        )
        with ExitStack() as processes:
            gateways = [processes.enter_context(GatewayProcess(env)) for _ in range(3)]
            for gateway in gateways:
                await _sized_run(gateway.url, 200_000)
            # Every run's keys and every budget counter expire (two windows, and some).
            assert await _wait_for(lambda: budget_counted(redis, "shop") == 0, 10)
            await asyncio.sleep(4.5)
            phantom = _flight(redis)
            kept = [await _sized_run(gateway.url, 10) for gateway in gateways]
    message = f"counters 0, runs in flight still published {phantom}; 10-byte runs kept {kept}"
    print(message)
    assert all(kept) and not phantom, message


async def test_one_applications_runs_started_together_do_not_evict_another_applications(
    tier_system: None, tmp_path: Path
) -> None:
    """Attack: the previous attack (12 runs of one 4.1 MB event started together after a
    few tiny ones) by application `shop`, on a Redis its operator sized for the budgets:
    `maxmemory` 48 MB for two applications of 16 MiB each (1.5x), `volatile-lfu` as
    docs/redis.md recommends. Application `other`'s 8 users each ended a run of one 500 KB
    event before (~5 MB in all, within its budget) and resume it afterwards.

    Expected: every `other` user still replays its run whole (what one application's runs
    may hold is its budget; the sum of the budgets fits). Measured (aea5dfe, 4 runs): shop
    kept 12 of 12; 0-1 of `other`'s 8 users replayed their run, the others got 404 (their
    session or their run's meta evicted: evicted_keys 75-112). Fix: as
    `test_runs_started_together_do_not_overrun_the_budget_whatever_the_typical_run`.
    Fixed (session 8): as the runs-started-together test: `other`'s 8 users replay whole, 8
    of 8."""
    size = 500_000
    with redis_at("48mb", "volatile-lfu") as redis:
        shop = TinyOrHugeUpstream(together=12)
        async with AsyncExitStack() as stack:
            shop_url, other_url = await start_upstreams(stack, shop.app(), SizedUpstream().app())
            env = redis_runs_env(
                tmp_path,
                redis.url,
                f'[apps.shop]\nupstream = "{shop_url}"\nresumable = true\n'
                f"resume_window_seconds = 30\nresume_redis_budget_bytes = {BUDGET}\n"
                f'[apps.other]\nupstream = "{other_url}"\nresumable = true\n'
                f"resume_window_seconds = 60\nresume_redis_budget_bytes = {BUDGET}\n",
            )
            with GatewayProcess(env) as gateway:
                users = [
                    await stack.enter_async_context(
                        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
                    )
                    for _ in range(8)
                ]
                runs = []
                for user in users:
                    async with user.post(
                        f"{gateway.url}/apps/other/agent/chat",
                        headers=CSRF,
                        json={"message": str(size)},
                    ) as response:
                        await response.read()
                        runs.append(response.headers["X-Run-Id"])

                async def whole(user: aiohttp.ClientSession, run_id: str) -> str:
                    """ "ok" when the run replays whole, else what came instead."""
                    async with user.get(
                        f"{gateway.url}/apps/other/runs/{run_id}",
                        headers={"Last-Event-ID": "0"},
                    ) as response:
                        body = await response.read()
                        if response.status != 200:
                            return str(response.status)
                        if b"event: error" in body or len(body) < size:
                            return f"200, {len(body)} bytes"
                        return "ok"

                before = [
                    await whole(user, run_id) for user, run_id in zip(users, runs, strict=True)
                ]
                assert before == ["ok"] * 8, before
                async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                    for _ in range(8):
                        assert await _run(http, gateway.url, "tiny")

                async def huge() -> bool:
                    jar = aiohttp.CookieJar(unsafe=True)
                    async with aiohttp.ClientSession(cookie_jar=jar) as http:
                        return await _run(http, gateway.url, "huge")

                kept = await asyncio.wait_for(asyncio.gather(*(huge() for _ in range(12))), 40)
                await asyncio.sleep(1.0)
                after = [
                    await whole(user, run_id) for user, run_id in zip(users, runs, strict=True)
                ]
                info = redis.client().info()
    message = (
        f"shop kept {sum(kept)} of 12 runs of 4.1 MB; redis used_memory "
        f"{int(info['used_memory']) / MIB:.1f} MiB, evicted_keys {info['evicted_keys']}; "
        f"other's 8 users replay their run whole: {after.count('ok')} of 8 ({after})"
    )
    print(message)
    assert after == ["ok"] * 8, message


async def test_a_retried_session_create_never_takes_another_sessions_key(
    tier_integration: None, redis: RedisServer
) -> None:
    """Attack on `RedisBackend.create`'s retry rule (a retry that finds the key holding its
    own value counts as created): the key already holds another session's value, and the
    first attempt's reply is lost (Redis frozen 0.4 s, socket timeout 0.25 s: the retry
    runs). Held (passing): the retry's `GET` finds another value, `create` answers False and
    the other session's value stays; a first attempt that finds the key answers False at
    once (no `GET`). (A value equal to another session's needs its id too: ids are 256
    random bits minted by the server, `reserve_id`, never a client's.)"""
    backend = RedisBackend(
        make_client(RedisOptions(url=redis.url, socket_timeout=0.25, op_timeout=2.0)),
        op_timeout=2.0,
    )
    client = redis.client()
    try:
        client.set("s:victim", b"victim's session", ex=60)
        assert not await backend.create("s:victim", b"attacker", 60)  # no retry
        redis.pause()
        asyncio.get_running_loop().call_later(0.4, redis.resume)
        try:
            created = await backend.create("s:victim", b"attacker", 60)
        finally:
            redis.resume()
        stored = client.get("s:victim")
    finally:
        await backend.close()
    assert (created, stored) == (False, b"victim's session")


class FastNumberedUpstream(SseUpstream):
    """`events` numbered events of `size` bytes each (`data: <i> xxx...`), written as fast
    as the gateway reads them."""

    def __init__(self, events: int = 400, size: int = 64 * 1024) -> None:
        self.events = events
        self.size = size

    async def write_events(self, response: web.StreamResponse) -> None:
        for i in range(self.events):
            await response.write(f"data: {i} ".encode() + b"f" * self.size + b"\n\n")


def _numbers(events: list[bytes]) -> list[int]:
    """The upstream's numbers of `events` (error events left out)."""
    out = []
    for event in events:
        for line in event.split(b"\n"):
            if line.startswith(b"data: ") and error_code(event) is None:
                out.append(int(line[6:].split(b" ", 1)[0]))
    return out


async def test_a_remote_reader_of_a_fast_run_gets_each_event_once_in_order_or_an_error(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack on the writer's byte-bounded backlog (`WRITE_BACKLOG_BYTES`, `RunWriter.add`
    dropping what the log dropped): a hostile upstream answers 400 events of 64 KiB (25 MiB)
    as fast as the gateway reads; the run's browser on replica A reads one event and leaves
    (a closed tab), and the run is resumed live on replica B after that event (the user's
    other device), read as fast as the client can, 5 times.
    Held (passing): B's reader gets the events once each, in order, from the one after its
    Last-Event-ID: all of them and the end, or a prefix and an explicit error
    (`resume_too_old`: the pump, no longer held back by a local reader, outran it by more
    than `resume_max_bytes`), never a silent gap nor a duplicate. Measured (aea5dfe): (events,
    error) (399, None) x3, (57, resume_too_old), (147, resume_too_old); 200 x 16 KiB: whole
    5 of 5."""
    upstream = FastNumberedUpstream()
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, upstream.app())
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{url}"\nresumable = true\n'
            f"resume_redis_budget_bytes = {2**30}\n",
        )
        with ExitStack() as processes:
            a, b = (processes.enter_context(GatewayProcess(env)) for _ in range(2))
            outcomes = []
            for _ in range(5):
                jar = aiohttp.CookieJar(unsafe=True)
                async with aiohttp.ClientSession(cookie_jar=jar) as http:
                    started = await http.post(
                        f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "x"}
                    )
                    run_id = started.headers["X-Run-Id"]
                    assert _numbers(await read_events(started, 1)) == [0]
                    async with http.get(
                        f"{b.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "1"}
                    ) as resumed:
                        await close_quietly(started)
                        assert resumed.status == 200, resumed.status
                        remote = await asyncio.wait_for(read_events(resumed), 40)
                numbers = _numbers(remote)
                last = error_code(remote[-1]) if remote else None
                outcomes.append((len(numbers), last))
                assert numbers == list(range(1, len(numbers) + 1)), (numbers[:5], last)
                assert (len(numbers), last) == (399, None) or last in (
                    "resume_too_old",
                    "run_limit_reached",
                ), (len(numbers), last)
    print(f"remote readers of 400 x 64 KiB: (events, error) {outcomes}")


async def test_entries_another_session_holds_are_never_served_to_a_stranger(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack on `SharedEntries` (a reader whose next entry another reader of the process
    holds gets it without a read): a victim's run of one 4.1 MB event, ended on replica A,
    is being replayed on replica B by the victim, who reads nothing more (B holds the entry
    for it). A stranger (another session of the same application, then through another
    application's path) asks B for that run, from its start and from just before the
    entry. Held (passing): 404 every time and not a byte of the entry (the owner and
    application check, one `HGETALL`, comes before any read or share)."""
    size = 4_100_000
    async with AsyncExitStack() as stack:
        shop_url, other_url = await start_upstreams(
            stack, SizedUpstream().app(), SizedUpstream().app()
        )
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{shop_url}"\nresumable = true\n'
            f'[apps.other]\nupstream = "{other_url}"\nresumable = true\n',
        )
        with ExitStack() as processes:
            a, b = (processes.enter_context(GatewayProcess(env)) for _ in range(2))
            victim = await stack.enter_async_context(
                aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            )
            stranger = await stack.enter_async_context(
                aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            )
            async with victim.post(
                f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": str(size)}
            ) as response:
                await response.read()
                run_id = response.headers["X-Run-Id"]
            await _run(stranger, b.url, "10")  # the stranger has a session of shop
            async with victim.get(
                f"{b.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "0"}
            ) as held:
                assert held.status == 200
                assert await held.content.read(1000)  # B holds the entry for the victim
                answers = []
                for app_id in ("shop", "other"):
                    for after in ("0", "1"):
                        async with stranger.get(
                            f"{b.url}/apps/{app_id}/runs/{run_id}",
                            headers={"Last-Event-ID": after},
                        ) as response:
                            body = await response.read()
                            answers.append((app_id, after, response.status, len(body)))
                        assert b"s" * 1000 not in body
    assert all(status == 404 and length < 1000 for *_, status, length in answers), answers


async def _small_run(store: RedisRunStore, run_id: str, events: int) -> None:
    """A run of `events` small events, one entry each, written as the pump does."""
    await store.create(
        run_id, RunMeta("owner", "shop"), ttl_ms=60_000, heartbeat_ms=60_000, window_ms=60_000
    )
    largest = 0
    for seq in range(1, events + 1):
        framed = f"data: {seq}\nid: {seq}\n\n".encode()
        largest = await store.append(
            run_id, [(seq, framed)], 1, expire_ms=60_000, exists=True, largest=largest
        )


async def test_a_redis_stall_between_watch_and_get_is_retried_like_any_other_read(
    tier_integration: None, redis: RedisServer
) -> None:
    """Attack on the watched plain catch-up read (app/runs/store.py `_watched_catchup`:
    `WATCH z`, `GET z`, `MULTI`/`XRANGE`/`EXEC`): Redis stalls (SIGSTOP 0.5 s: a fork, a
    slow script, a failover, a restart) right after the `WATCH`, so the `GET` meets its
    socket timeout (0.25 s). redis-py turns a connection error while watching into a
    `WatchError` (`Pipeline._disconnect_reset_raise_on_watching`: "A TimeoutError occurred
    while watching one or more keys"); `_watched_catchup` suppresses `WatchError` only around
    `EXEC`, and `RedisBackend._run` does not retry it (`retryable`: not a connection error):
    `StoreUnavailable` at once, with 2 of its 3 retries and 1.5 s of its 2 s budget unused,
    and the replay or follower answers `run_store_unavailable`. The same stall during the
    `WATCH` itself or the `EXEC` is retried (and read).

    Measured (aea5dfe): `StoreUnavailable: WatchError: A TimeoutError occurred while
    watching one or more keys` (the same stall right before the `WATCH` or before the
    `EXEC`: 10 entries, retried). Expected: the read retried like any other
    (10 entries). Fix (app/runs/store.py `_watched_catchup`): treat a `WatchError` raised
    before `EXEC` (from `watch`/`get`) like a connection error: re-raise it as
    `redis.exceptions.ConnectionError` (retryable), or catch it and fall back to
    `CATCHUP_RANGE` as after an aborted `EXEC`.
    Fixed (session 8): a `WatchError` before `EXEC` is re-raised as a connection error
    (`_watched_catchup`), retried by the store."""
    backend = RedisBackend(
        make_client(RedisOptions(url=redis.url, socket_timeout=0.25, op_timeout=2.0)),
        op_timeout=2.0,
    )
    store = RedisRunStore(backend, backend, "t:")
    original = aioredis.client.Pipeline.watch
    stalls = 0

    async def watch_then_stall(self: aioredis.client.Pipeline, *names: Any) -> Any:
        nonlocal stalls
        done = await original(self, *names)
        if stalls == 0:
            stalls += 1
            redis.pause()
            asyncio.get_running_loop().call_later(0.5, redis.resume)
        return done

    try:
        await _small_run(store, "r1", 10)
        outcome: str
        with mock.patch.object(aioredis.client.Pipeline, "watch", watch_then_stall):
            try:
                entries = await store.range_after("r1", 0, 16, app_id="shop", client="c")
                outcome = f"{len(entries)} entries"
            except StoreUnavailable as err:
                outcome = f"StoreUnavailable: {err}"
            finally:
                redis.resume()
    finally:
        await backend.close()
    print(outcome)
    assert stalls == 1
    assert outcome == "10 entries", outcome


async def test_replays_across_short_redis_stalls_all_end_whole(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: the previous test through HTTP. 16 browsers replay 4 ended runs of 100 small
    events (101 entries: plain catch-up reads) on replica B as fast as they can for 5 s,
    while Redis stalls 3 times for 0.8 s (SIGSTOP: a fork, a slow command, a failover):
    longer than the follow client's socket timeout (0.25 + one heartbeat: 0.5 s here), well
    within its operation budget (1 + 0.25 s) with retries.

    Expected: every replay that started whole (a read that met the stall retries after it,
    as every other read does; a 503 before the stream, the resume's meta read failing
    during a stall, is tolerated). Measured (aea5dfe, 5 runs): 13, 13, 27, 28, 20 replays
    (of 430-1,420) ended `run_store_unavailable`, and B logged exactly as many "reading
    failed (... WatchError: A TimeoutError occurred while watching one or more keys)": all
    of them the `GET` after the `WATCH` (most "catch-up read failed: WatchError ...": the
    gate's rule that a `StoreUnavailable` inside a slot fails every waiter,
    app/runs/catchup.py `CatchupGate.slot`, turns one unretried `WatchError` into a failure
    of every reader queued behind it, of any application). Fix: as the previous test.
    Fixed (session 8): as the previous test."""
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, CountingUpstream(count=100, delay=0.002).app())
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{url}"\nresumable = true\n'
            f"resume_redis_budget_bytes = {2**30}\n",
        )
        with ExitStack() as processes:
            a, b = (processes.enter_context(GatewayProcess(env)) for _ in range(2))
            http = await stack.enter_async_context(
                aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            )
            runs = []
            for _ in range(4):
                async with http.post(
                    f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "x"}
                ) as response:
                    await response.read()
                    runs.append(response.headers["X-Run-Id"])
            outcomes: dict[str, int] = {}
            until = time.monotonic() + 5

            async def replays(i: int) -> None:
                while time.monotonic() < until:
                    async with http.get(
                        f"{b.url}/apps/shop/runs/{runs[i % 4]}", headers={"Last-Event-ID": "0"}
                    ) as response:
                        if response.status != 200:
                            outcome = str(response.status)
                        else:
                            events = await read_events(response)
                            outcome = (error_code(events[-1]) or "whole") if events else "empty"
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1

            async def stalls() -> None:
                for _ in range(3):
                    await asyncio.sleep(0.5)
                    redis.pause()
                    try:
                        await asyncio.sleep(0.8)
                    finally:
                        redis.resume()

            try:
                await asyncio.wait_for(
                    asyncio.gather(stalls(), *(replays(i) for i in range(16))), 30
                )
            finally:
                redis.resume()
            watch_errors = sum("WatchError" in line for line in b.stderr.splitlines())
    message = f"replays across 3 stalls of 0.8 s: {outcomes}; B logged {watch_errors} WatchErrors"
    print(message)
    # (A 503: the resume's meta read itself failed during a stall, before any event.)
    assert set(outcomes) <= {"whole", "503"}, message


async def test_clients_alternating_tiny_and_huge_runs_stay_within_the_claimed_overshoot(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: `test_runs_started_together_...` without any coordination: on each of 3
    replicas, 4 browsers each start, back to back for 4 s, 3 runs of one 10-byte event and
    then one of one 4.1 MB event (~5.5 MB of budget), again and again. The typical run each
    replica counts a new run as is ~1/4 of a huge one, and 12 runs are in flight at once:
    each check counts the others' new runs as a fraction of what they will hold.

    Measured (aea5dfe, 2 shared cores, 6 runs): 7-12 huge runs kept, Redis counts 36.8-62.9
    MiB of 16 MiB (2.30-3.93x; 7 tiny runs per huge one: 52.7 MiB, 3.29x); for comparison
    only 4.1 MB runs, back to back: 26.1 MiB (1.63x); attack-gate-9's 1 MiB runs
    (tests/test_runs_budget_attacks6.py, this commit): 16.1 MiB (1.00x). Expected: within
    1.5x (the claim for 3 replicas). Fix: as `test_runs_started_together_...`.
    Fixed (session 8): as the runs-started-together test: 1.00-1.32x in 3 runs."""
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, SizedUpstream().app())
        env = _shop_env(tmp_path, redis, url)
        with ExitStack() as processes:
            gateways = [processes.enter_context(GatewayProcess(env)) for _ in range(3)]
            until = time.monotonic() + 4

            async def browser(url: str) -> list[bool]:
                kept = []
                jar = aiohttp.CookieJar(unsafe=True)
                async with aiohttp.ClientSession(cookie_jar=jar) as http:
                    while time.monotonic() < until:
                        for _ in range(3):
                            await _run(http, url, "10")
                        kept.append(await _run(http, url, "4100000"))
                return kept

            kept = await asyncio.wait_for(
                asyncio.gather(*(browser(g.url) for g in gateways for _ in range(4))), 40
            )
            await asyncio.sleep(1.0)  # the last costs flushed
            counted = budget_counted(redis, "shop")
    huge = [k for browser_kept in kept for k in browser_kept]
    message = (
        f"3 replicas x 4 browsers alternating 3 tiny and 1 huge run: {sum(huge)} of "
        f"{len(huge)} huge runs kept; Redis counts {counted / MIB:.1f} MiB of "
        f"{BUDGET / MIB:.0f} MiB ({counted / BUDGET:.2f}x)"
    )
    print(message)
    assert counted <= BUDGET * 1.5, message
