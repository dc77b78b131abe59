"""Attacks on the per-application budget of resumable-run data in Redis
(`resume_redis_budget_bytes`, app/runs/budget.py, app/runs/store.py budget_used/budget_add,
app/runs/start.py start_run).

Each test plays application `shop`'s hostile upstream and anonymous browser clients against
real gateway processes and a real redis-server, and asserts the safe outcome: what `shop`'s
runs hold in Redis stays within what its budget counts (docs/resumable-streams.md: "the
current and the previous slot together count at least every byte the application's ended runs
still keep"; "one application's ended runs hold at most its budget plus what its runs in flight
on other replicas add"). Each fails on the code of 2fc50df; the docstrings give the numbers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer
from tests.runs_helpers import (
    CSRF,
    CountingUpstream,
    SseUpstream,
    budget_counted,
    flood_runs,
    redis_at,
    redis_runs_env,
    run_keys_bytes,
    start_upstreams,
)

pytestmark = pytest.mark.redis_server


@pytest.fixture
def redis(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("96mb", "noeviction") as server:
        yield server


class EmptyRunUpstream(SseUpstream):
    """`shop`'s hostile upstream: an event stream that ends at once, without a single event
    (or with only a comment): a `done` run of 0 framed bytes."""

    async def write_events(self, response: web.StreamResponse) -> None:
        await response.write(b": nothing\n\n")


async def test_runs_without_events_are_counted_in_the_budget(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: `shop`'s upstream answers every agent request with an event stream holding no
    event (a comment, then the end). Each becomes a run that ends `done` with 0 framed bytes,
    so `budget_add` adds `redis_cost(0) == 0` (and `UncountedBytes` never sees it), yet Redis
    keeps its `m` hash and its `e` stream (one end-marker entry; a new stream's listpack is
    allocated at `stream-node-max-bytes`, 4 KiB) for the window: ~4.7 KiB per run, counted as
    nothing. The budget never says no: every run is resumable, whatever the budget.

    Measured (2fc50df, one replica, budget 256 KiB, 1500 runs in 3.0 s from one address, 8
    sessions): 1500 of 1500 runs resumable, 1500 runs of shop in Redis holding 7.09 MiB
    (`MEMORY USAGE`), the budget counters at 0 bytes. The only bound is the request rate x the
    window: at ~500 runs/s and the default 60 s window, ~140 MiB for any budget (see
    test_runs_without_events_fill_redis_for_another_application for the effect on another
    application).
    Fix: count every recorded run at least `_RUN_OVERHEAD_BYTES` (`redis_cost(0)` must not be
    0: a run's keys exist from `create`), better measured (an empty stream is ~4.6 KiB)."""
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, EmptyRunUpstream().app())
        budget = 256 * 1024
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{url}"\nresumable = true\nresume_window_seconds = 60\n'
            f"resume_redis_budget_bytes = {budget}\n",
        )
        with GatewayProcess(env) as gateway:
            started = time.monotonic()
            resumable = await flood_runs(gateway.url, 1500)
            took = time.monotonic() - started
            await asyncio.sleep(0.5)  # every end recorded
            runs, held = run_keys_bytes(redis, "shop")
            counted = budget_counted(redis, "shop")
    assert held <= max(counted, budget) * 1.2, (
        f"{resumable} of 1500 runs resumable in {took:.1f} s; {runs} runs of shop in Redis "
        f"hold {held / 2**20:.2f} MiB, its budget counts {counted} bytes (budget {budget})"
    )


class OneTinyEventUpstream(SseUpstream):
    """`shop`'s hostile upstream: one 1-byte event (`x`, a bare field name), then the end."""

    async def write_events(self, response: web.StreamResponse) -> None:
        await response.write(b"x\n\n")


async def test_the_budget_counts_what_a_small_run_holds(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: many minimal runs (one 1-byte event each, `done`). Each is counted
    `redis_cost(11) == 4109` bytes, but a run's keys take more: the `e` stream alone is
    ~4.6 KiB (its first listpack node is allocated at `stream-node-max-bytes`, 4096, plus the
    stream and rax headers), plus the `m` hash and, for 4 heartbeats, the `h` key.

    Measured (2fc50df, one replica, default heartbeat 0.5 s, 1000 runs in ~2 s): counted
    4107 KB, their keys take 5008 KB (`MEMORY USAGE`; `used_memory` grew 5165 KB): 1.22x
    (1.26x by `used_memory`), past the "budget x 1.2" the docs size Redis for: with the
    default 64 MiB budget, ~80 MiB held.
    Fix: `_RUN_OVERHEAD_BYTES` at what an (almost) empty run really takes (~5 KiB with
    Redis 7's defaults; better derived from `stream-node-max-bytes`), and count it per run
    also for the uncounted runs (`redis_cost` of their sum adds it once)."""
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, OneTinyEventUpstream().app())
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{url}"\nresumable = true\nresume_window_seconds = 60\n',
        )
        env["RUN_HEARTBEAT_SECONDS"] = "0.5"
        with GatewayProcess(env) as gateway:
            resumable = await flood_runs(gateway.url, 1000)
            await asyncio.sleep(0.5)
            runs, held = run_keys_bytes(redis, "shop")
            counted = budget_counted(redis, "shop")
    assert resumable == runs == 1000
    assert held <= counted, (
        f"{runs} one-event runs: their keys take {held / 1000:.0f} KB in Redis, the budget "
        f"counts {counted / 1000:.0f} KB ({held / max(counted, 1):.2f}x)"
    )


class TinyEventsUpstream(SseUpstream):
    """`shop`'s hostile upstream: `count` one-byte events (`x`, a bare field name), one per
    write, `delay` apart: each reaches Redis in its own `XADD` entry."""

    def __init__(self, count: int, delay: float) -> None:
        self.count = count
        self.delay = delay

    async def write_events(self, response: web.StreamResponse) -> None:
        for _ in range(self.count):
            await response.write(b"x\n\n")
            await asyncio.sleep(self.delay)


async def test_the_budget_counts_what_redis_needs_for_many_tiny_events(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: `shop`'s upstream sends tiny events (`x\\n\\n`: framed `x\\nid: <n>\\n\\n`,
    ~10 bytes) one at a time, ~1 ms apart, so the pump writes each in its own stream entry
    (one `XADD` in flight: nothing to group). A stream entry costs Redis ~17 bytes beyond its
    data (entry id deltas, flags, the `f` field, lengths, back-lengths in the listpack, plus
    the nodes), far more than the quarter `redis_cost` adds: the runs hold about twice what
    the budget counts (and the 4 KiB per run does not cover it past a few hundred events).

    Measured (2fc50df, one replica, 6 runs of 3000 tiny events): the budget counts 280 KiB
    for them, their keys take 514 KiB in Redis (`MEMORY USAGE`): 1.84x (1.51x-1.93x over
    tries: some events share an entry when the previous `XADD` is still in flight); a bare
    10 000-event stream: 119 KB framed, `redis_cost` 153 KB, `MEMORY USAGE` 323 KB (2.1x).
    With the default budget of 64 MiB, `shop` keeps ~130 MiB, past the "budget x 1.2" the
    docs tell operators to size Redis for.
    Fix: count per stream entry as well (e.g. `redis_cost(bytes, entries)` adding ~24 bytes
    an entry: the pump knows how many `XADD` entries it wrote), or group tiny events."""
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, TinyEventsUpstream(3000, 0.001).app())
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{url}"\nresumable = true\nresume_window_seconds = 60\n',
        )
        with GatewayProcess(env) as gateway:
            resumable = await flood_runs(gateway.url, 6, sessions=1, per_session=6)
            await asyncio.sleep(0.5)
            runs, held = run_keys_bytes(redis, "shop")
            counted = budget_counted(redis, "shop")
    assert resumable == 6 and runs == 6
    assert held <= counted, (
        f"{runs} runs of 3000 tiny events: their keys take {held / 1024:.0f} KiB in Redis, "
        f"the budget counts {counted / 1024:.0f} KiB ({held / max(counted, 1):.2f}x)"
    )


@pytest.fixture
def small_redis(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("24mb", "noeviction") as server:
        yield server


async def test_runs_without_events_fill_redis_for_another_application(
    tier_system: None, tmp_path: Path, small_redis: RedisServer
) -> None:
    """The effect of the zero-cost runs (test_runs_without_events_are_counted_in_the_budget)
    on another application. Redis (24 MiB) is sized far above what the docs ask for (the
    budgets x 1.2 plus the sessions): `shop` 1 MiB, `other` 1 MiB. `shop`'s hostile upstream
    answers with empty event streams; its clients (8 sessions per replica, one address) start
    9000 runs.

    Measured (2fc50df, two replicas, 4500 runs through each): 5359 of 9000 resumable in
    9.7 s (the later ones could not be created: Redis full), Redis at 24.0 MiB of 24, and a
    new user of `other` gets 503 `session_store_full` instead of its (resumable) answer, for
    the window (60 s)."""
    redis = small_redis
    victim = CountingUpstream(count=5, delay=0.01)
    async with AsyncExitStack() as stack:
        urls = await start_upstreams(stack, EmptyRunUpstream().app(), victim.app())
        mib = 1024 * 1024
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{urls[0]}"\nresumable = true\n'
            f"resume_window_seconds = 60\nresume_redis_budget_bytes = {mib}\n"
            f'[apps.other]\nupstream = "{urls[1]}"\nresumable = true\n'
            f"resume_window_seconds = 60\nresume_redis_budget_bytes = {mib}\n",
        )
        with GatewayProcess(env) as a, GatewayProcess(env) as b:
            started = time.monotonic()
            resumable = sum(
                await asyncio.gather(
                    flood_runs(a.url, 4500, strict=False), flood_runs(b.url, 4500, strict=False)
                )
            )
            took = time.monotonic() - started
            used = int(redis.client().info("memory")["used_memory"])
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as user:
                response = await user.post(
                    f"{b.url}/apps/other/agent/chat", headers=CSRF, json={"message": "hi"}
                )
                body = await response.read()
    assert response.status == 200 and "X-Run-Id" in response.headers, (
        f"after {resumable} resumable empty runs of shop in {took:.1f} s (Redis at "
        f"{used / mib:.1f} MiB of 24), other's new user got {response.status} {body[:100]!r}"
    )


class TinyBurstsUpstream(SseUpstream):
    """`shop`'s hostile upstream: `chunks` writes of `per_chunk` 1-byte events (`x\\n\\n`)
    each, `pause` apart: far more events than a run keeps (`resume_max_events`, 10 000)."""

    def __init__(self, chunks: int, per_chunk: int, pause: float) -> None:
        self.chunks = chunks
        self.per_chunk = per_chunk
        self.pause = pause

    async def write_events(self, response: web.StreamResponse) -> None:
        for _ in range(self.chunks):
            await response.write(b"x\n\n" * self.per_chunk)
            await asyncio.sleep(self.pause)


async def test_a_capped_run_holds_no_more_in_redis_than_its_log(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: bursts of tiny events (40 writes of 21 000 `x` events, 50 ms apart: up to 840 000
    events). The log keeps the last `resume_max_events` (10 000, ~130 KB) and the budget
    counts those (`run.log.bytes`). But the pump writes every event it parsed (`writer.add`
    gets the whole batch, trimmed ones included) in `ENTRY_BYTES` (256 KiB) groups, and
    `MINID` keeps an entry whose LAST id is at or above the log's first: the oldest entry
    kept still holds up to 256 KiB of events the log already dropped.

    Measured (2fc50df, one replica, 4 such runs at once; they end `run_limit_reached` after
    ~85 000 events, once their reader fell behind: it makes no difference): each keeps 3
    entries, e.g. `0-84009` holding events 63 846..84 009 (262 132 bytes) while its log (and
    its count) starts at 75 692. Counted 679 KB, their keys take 1442 KB in Redis
    (`MEMORY USAGE`): 2.12x. With the default 64 MiB budget, runs shaped like this keep
    ~135 MiB.
    Fix: count what was written to Redis and is still there (the bytes of the entries from
    the first one kept, not `run.log.bytes`), or cut the groups at the log's bounds (never
    send events already trimmed from the log; start a new group where the log starts)."""
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, TinyBurstsUpstream(40, 21_000, 0.05).app())
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{url}"\nresumable = true\nresume_window_seconds = 60\n',
        )
        with GatewayProcess(env) as gateway:
            resumable = await flood_runs(gateway.url, 4, sessions=4, per_session=1)
            await asyncio.sleep(0.5)
            runs, held = run_keys_bytes(redis, "shop")
            counted = budget_counted(redis, "shop")
    assert resumable == runs == 4
    assert held <= counted, (
        f"{runs} runs of tiny-event bursts: their keys take {held / 1000:.0f} KB in Redis, "
        f"the budget counts {counted / 1000:.0f} KB ({held / max(counted, 1):.2f}x)"
    )


class MixedUpstream(SseUpstream):
    """`shop`'s hostile upstream: for `{"message": "empty"}` an empty event stream (a run
    counted 0: test_runs_without_events_are_counted_in_the_budget); otherwise one 8 KB event,
    50 ms later a second one and the end: the first goes to Redis in its own `XADD` (which
    creates the `e` stream, with no TTL yet), the end comes before the run's first heartbeat
    (which would give it one)."""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if (await request.json()).get("message") != "empty":
            return await super().chat(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write_eof()
        return response

    async def write_events(self, response: web.StreamResponse) -> None:
        await response.write(b"data: " + b"z" * 8000 + b"\n\n")
        await asyncio.sleep(0.05)
        await response.write(b"data: end\n\n")


@pytest.fixture
def tiny_redis(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("8mb", "noeviction") as server:
        yield server


async def test_a_run_whose_end_redis_refused_leaves_nothing_behind_for_ever(
    tier_system: None, tmp_path: Path, tiny_redis: RedisServer
) -> None:
    """Attack: keep Redis at `maxmemory` (here with `shop`'s zero-cost empty runs,
    test_runs_without_events_are_counted_in_the_budget; sessions or another application's
    load do as well) while `shop`'s runs of one 8 KB event are in flight. A run whose
    `XADD` got in just under `maxmemory` created its `e` stream without a TTL (the TTL comes
    with the first heartbeat, `tick`, or the end, `END_RUN`). If its end then meets `OOM`
    (another write took Redis over meanwhile: `END_RUN`'s `XADD` is refused and the script
    returns before its `PEXPIRE`s), that is `StoreFull`: the end is not recorded, the run is
    never counted (`budget_add` skipped, its `UncountedBytes` dropped), and the `e` stream
    has NO TTL: it stays in Redis for ever. Under `noeviction` it is never freed; under the
    recommended `volatile-lfu` never evicted either (only keys with a TTL are: the sessions
    go instead). Each OOM episode adds more, long after the attack and every window; nothing
    counts them, so they also escape the budget.

    Measured (2fc50df, one replica, Redis 8 MiB noeviction, window 5 s, budget 4 MiB; 20 s
    of flooding): two tries: 10 and 136 `e` streams left two windows later, all of them
    without a TTL (0.08 and 1.15 MiB, for ever; Redis back at 1.4 / 2.8 MiB instead of
    1.2). The count is a race at the `maxmemory` edge (Redis 7 refuses a write whose query
    buffer would take it over, so one leaked run holds at most the headroom left), but it
    only grows: a patient attacker fills Redis permanently. (With a 12 MiB Redis, window 8 s,
    10 s of flooding, one try in three leaked nothing: this test floods longer.)
    Fix: give the `e` stream its TTL when it is created (the writer's `XADD` and a `PEXPIRE`
    in one script, like `END_RUN`), and make `END_RUN` set the TTLs even when its `XADD` is
    refused (`PEXPIRE` first: it is not `denyoom`)."""
    redis = tiny_redis
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, MixedUpstream().app())
        window = 5
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{url}"\nresumable = true\n'
            f"resume_window_seconds = {window}\nresume_redis_budget_bytes = {4 * 2**20}\n",
        )
        with GatewayProcess(env) as gateway:
            started = time.monotonic()

            async def runs(message: str, sessions: int) -> int:
                kept = 0
                while time.monotonic() - started < 20:
                    kept += await flood_runs(
                        gateway.url, 200, sessions=sessions, message=message, strict=False
                    )
                return kept

            empty, small = await asyncio.gather(runs("empty", 6), runs("small", 2))
            await asyncio.sleep(2 * window + 1)  # every window passed
            client = redis.client()
            left = list(client.scan_iter(match=b"*run:{*}:e", count=1000))
            no_ttl = [key for key in left if client.pttl(key) == -1]
            leaked = sum(int(client.memory_usage(key, samples=0) or 0) for key in no_ttl)
            used = int(client.info("memory")["used_memory"])
    assert no_ttl == [], (
        f"after {empty} empty and {small} small resumable runs of shop and two windows: "
        f"{len(no_ttl)} of {len(left)} `e` streams left have no TTL, {leaked / 2**20:.2f} MiB "
        f"held for ever (Redis now {used / 2**20:.1f} MiB)"
    )


@pytest.fixture
def lfu_redis(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("24mb", "volatile-lfu") as server:
        yield server


async def test_runs_without_events_never_evict_another_applications_runs(
    tier_system: None, tmp_path: Path, lfu_redis: RedisServer
) -> None:
    """The zero-cost runs (test_runs_without_events_are_counted_in_the_budget) under the
    RECOMMENDED `maxmemory-policy volatile-lfu` (docs/redis.md): no 503 then, Redis evicts
    instead, and what it evicts is other applications' data. A user of `other` gets a
    resumable answer (run of 31 events, within `other`'s 1 MiB budget); then `shop`'s clients
    start 10 000 empty runs (budget 1 MiB, counted 0) through two replicas; the user resumes
    its run from the start, within its window.

    Measured (2fc50df, 3 tries of 3): 10 000 of 10 000 empty runs resumable in ~5 s, Redis at
    24.0 MiB, ~18 000 keys evicted, among them the `other` user's session (`GET
    /apps/other/session` answers `{"data": {}}`: a new one), so its run, whose keys are still
    there, answers 404 `run_not_found`: the user lost its session and its answer. (With 6000
    runs: one try in two.)
    Fix: as for test_runs_without_events_are_counted_in_the_budget."""
    redis = lfu_redis
    victim = CountingUpstream(count=30, delay=0.001)
    async with AsyncExitStack() as stack:
        urls = await start_upstreams(stack, EmptyRunUpstream().app(), victim.app())
        mib = 1024 * 1024
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{urls[0]}"\nresumable = true\n'
            f"resume_window_seconds = 60\nresume_redis_budget_bytes = {mib}\n"
            f'[apps.other]\nupstream = "{urls[1]}"\nresumable = true\n'
            f"resume_window_seconds = 60\nresume_redis_budget_bytes = {mib}\n",
        )
        with GatewayProcess(env) as a, GatewayProcess(env) as b:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as user:
                async with user.post(
                    f"{b.url}/apps/other/agent/chat", headers=CSRF, json={"message": "hi"}
                ) as response:
                    assert response.status == 200 and "X-Run-Id" in response.headers
                    run_id = response.headers["X-Run-Id"]
                    await response.read()
                resumable = sum(
                    await asyncio.gather(
                        flood_runs(a.url, 5000, strict=False), flood_runs(b.url, 5000, strict=False)
                    )
                )
                used = int(redis.client().info("memory")["used_memory"])
                evicted = int(redis.client().info("stats")["evicted_keys"])
                async with user.get(f"{a.url}/apps/other/runs/{run_id}") as resumed:
                    status = resumed.status
                    body = await resumed.read()
                async with user.get(f"{a.url}/apps/other/session") as session:
                    session_body = await session.read()
            keys = redis.client().keys(f"*run:{{{run_id}}}:*".encode())
    assert status == 200 and body.count(b"\n\n") == 31, (
        f"after {resumable} resumable empty runs of shop (Redis {used / mib:.1f} MiB of 24, "
        f"{evicted} keys evicted), other's user resuming its run got {status} {body[:60]!r}; "
        f"its run's keys left: {sorted(keys)}; its session: {session_body[:80]!r}"
    )
