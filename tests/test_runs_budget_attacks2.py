"""Second attack on the per-application budget of resumable-run data in Redis, after its fixes
(19c8107: `redis_cost` counts framed bytes + 1/4 + 32 B per event + 6 KiB per run, `run_cost`
one 256 KiB entry once the log trimmed, the stream's TTL with its first `XADD`, `END_RUN`'s
`PEXPIRE`s before its `XADD`).

Each test plays application `shop`'s hostile upstream and its own (anonymous) browser clients
against real gateway processes and a real redis-server, and asserts the safe outcome. Each
fails on 9f91ccf; the docstrings give the attack and the numbers measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from redis import exceptions as redis_errors

from app.runs.costs import RUN_OVERHEAD_BYTES
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer
from tests.runs_helpers import (
    CSRF,
    CountingUpstream,
    OneBigEventUpstream,
    SseUpstream,
    budget_counted,
    flood_runs,
    other_users,
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


class MidSizeEventsUpstream(SseUpstream):
    """`shop`'s hostile upstream: `count` events whose framed size is `framed` bytes (one
    `data:` line), one per write, `delay` apart: each reaches Redis in its own `XADD` entry,
    and each entry is just too big to share a stream node (4096 bytes) with the next."""

    def __init__(self, count: int, framed: int, delay: float) -> None:
        self.count = count
        self.framed = framed
        self.delay = delay

    async def write_events(self, response: web.StreamResponse) -> None:
        for i in range(1, self.count + 1):
            # framed: `data: zzz...` + `\nid: <i>\n\n` (7 + digits)
            body = b"data: " + b"z" * (self.framed - 6 - 7 - len(str(i)))
            await response.write(body + b"\n\n")
            await asyncio.sleep(self.delay)


async def test_the_budget_counts_what_mid_size_events_hold(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: `shop`'s upstream sends events of ~2031 framed bytes, one per write, 2 ms apart
    (each reaches Redis in its own `XADD` entry). A stream node (listpack) takes entries until
    4096 bytes: two such entries do not fit, so each gets its own node, shrunk to fit (~2080
    bytes) when the next node starts, into jemalloc's 2560-byte class, plus its radix-tree
    node (`MEMORY USAGE` counts ~260 bytes per node). Redis holds ~2831 bytes per event;
    `redis_cost` counts 2031 + 507 (a quarter) + 32 = 2570: the quarter covers the size class
    but not the tree node and the listpack's own bytes.

    Measured (9f91ccf, Redis 7.0.15; a bare stream of 200 such entries: 2831 B held per event
    against 2571 counted, 1.10x; the worst of the sizes 1500..8400 bytes, others 1.03-1.10x).
    Through the gateway (one replica, 4 runs of 1000 such events, 2 tries): their keys take
    11 289-11 293 KB (`MEMORY USAGE`; `used_memory` grew 10 692 KB), the budget counts
    10 308 KB: 1.095x. With the default 64 MiB budget, ~70 MiB held.
    Fix: count per entry what a node costs when an entry is alone in one (e.g. 32 B per event
    plus ~300 B per entry of >= ~2 KiB, or the size class of `framed + 64` rounded up to
    jemalloc's classes plus 300 B), or measure `MEMORY USAGE` of the run's `e` key at its end
    (one command per run) and count that."""
    upstream = MidSizeEventsUpstream(1000, 2031, 0.002)
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, upstream.app())
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{url}"\nresumable = true\nresume_window_seconds = 60\n',
        )
        with GatewayProcess(env) as gateway:
            client = redis.client()
            before = int(client.info("memory")["used_memory"])
            resumable = await flood_runs(gateway.url, 4, sessions=4, per_session=1)
            await asyncio.sleep(0.5)
            runs, held = run_keys_bytes(redis, "shop")
            counted = budget_counted(redis, "shop")
            grown = int(client.info("memory")["used_memory"]) - before
    assert resumable == runs == 4
    assert held <= counted, (
        f"{runs} runs of 1000 events of 2031 framed bytes: their keys take "
        f"{held / 1000:.0f} KB in Redis (used_memory grew {grown / 1000:.0f} KB), the budget "
        f"counts {counted / 1000:.0f} KB ({held / max(counted, 1):.3f}x)"
    )


class HeldBurstUpstream(SseUpstream):
    """`shop`'s hostile upstream: answers at once with an event stream's head (the run starts,
    `X-Run-Id` reaches the browser), then holds until `go` is set, then sends `events` events
    of `size` bytes and the end in one write (a `Content-Length` body: the pump reads the
    events and the end together, so they go to Redis with the run's end, in `END_RUN`)."""

    def __init__(self, events: int, size: int) -> None:
        self.body = b"".join(b"data: " + b"y" * (size - 8) + b"\n\n" for _ in range(events))
        self.go = asyncio.Event()
        self.waiting = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.content_length = len(self.body)
        await response.prepare(request)
        self.waiting += 1
        await self.go.wait()
        await response.write(self.body)
        await response.write_eof()
        return response


@pytest.fixture
def small_redis(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("16mb", "noeviction") as server:
        yield server


async def test_runs_ending_at_maxmemory_neither_pass_it_nor_escape_the_budget(
    tier_system: None, tmp_path: Path, small_redis: RedisServer
) -> None:
    """Attack: `shop`'s clients start 24 runs whose upstream holds its answer; then Redis
    reaches `maxmemory` (`noeviction`; here the test fills it, as another application's
    sessions or runs would); within a heartbeat the upstream sends each run ~60 KB of events
    and its end at once. Each run's events go to Redis with its end, in `END_RUN`, whose first
    command is now a `PEXPIRE` (F6's fix). Redis refuses a script's `denyoom` command at
    `maxmemory` only while the script has written nothing (Redis 7: `scriptVerifyOOM`, "we
    can't stop in the middle"): after the `PEXPIRE` the `XADD` is ALLOWED, so every such end
    writes its events past `maxmemory`. Then `budget_add`'s `INCRBY` is refused (OOM): the
    run is recorded (readable for its window) but never counted in `shop`'s budget (its
    uncounted cost is dropped too). The store.py comment ("at `maxmemory` the XADD is refused
    (OOM) but PEXPIRE is not") is wrong.

    Measured (9f91ccf, Redis 7.0.15, one replica, 3 tries): all 24 runs complete and
    recorded, Redis at 17.46-17.48 MiB of `maxmemory` 16 MiB, the 24 runs hold 1595 KB, the
    budget counts 0 bytes. Directly with
    redis-cli: 20 `END_RUN`s of 250 KB at `maxmemory` 8 MiB all succeeded, Redis 13.2 MiB of
    8; the `INCRBY` after them refused. Per run up to `ENTRY_BYTES` (256 KiB) past
    `maxmemory` (the end's group), for every run that ends in that state.
    Fixed (after 9f91ccf): END_RUN's XADD goes first, its TTLs after either way; a run whose
    count Redis refused stays counted by its replica for its keys' TTL.
    Suggested fix: in `END_RUN`, try the `XADD` first (`redis.pcall`) and set the TTLs after it
    either way (`PEXPIRE` still runs at OOM: the script has not written when the `XADD` is refused,
    so F6 stays fixed), or check `used_memory` against `maxmemory` in the script; and count
    the run even when its end could not be recorded (keep its cost in `uncounted` until an
    `INCRBY` succeeds, or count it at its start)."""
    redis = small_redis
    upstream = HeldBurstUpstream(events=30, size=2000)
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, upstream.app())
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{url}"\nresumable = true\nresume_window_seconds = 60\n',
        )
        env["RUN_HEARTBEAT_SECONDS"] = "2"
        with GatewayProcess(env) as gateway:
            client = redis.client()
            maxmemory = int(str(client.config_get("maxmemory")["maxmemory"]))

            async def one(http: aiohttp.ClientSession) -> tuple[bool, bytes]:
                async with http.post(
                    f"{gateway.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "x"}
                ) as response:
                    return "X-Run-Id" in response.headers, await response.read()

            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                async with http.get(f"{gateway.url}/apps/shop/session") as response:
                    await response.read()
                tasks = [asyncio.create_task(one(http)) for _ in range(24)]
                while upstream.waiting < 24:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)  # every run created
                # Another application's data takes Redis to `maxmemory`.
                i = 0
                try:
                    while True:
                        client.set(f"other:fill:{i}", b"o" * 50_000)
                        i += 1
                except redis_errors.ResponseError as err:  # OOM: Redis is at maxmemory
                    assert "maxmemory" in str(err)
                at_limit = int(client.info("memory")["used_memory"])
                upstream.go.set()
                results = await asyncio.gather(*tasks)
            await asyncio.sleep(0.5)
            used = int(client.info("memory")["used_memory"])
            runs, held = run_keys_bytes(redis, "shop")
            counted = budget_counted(redis, "shop")
            ended = [b for ok, b in results if ok and b.count(b"\n\n") == 30]
    mib = 2**20
    # At `maxmemory` Redis also refuses the counter's INCRBY: what the refused runs keep (their
    # meta keys, no events) stays counted by their replica (`RunRegistry._settle_cost`) for
    # their keys' TTL, not in Redis.
    assert used <= maxmemory and held <= counted + runs * RUN_OVERHEAD_BYTES, (
        f"Redis at {at_limit / mib:.2f} MiB of {maxmemory / mib:.0f} when 24 held runs of shop "
        f"got their ~60 KB and end: {len(ended)} complete; Redis now {used / mib:.2f} MiB "
        f"(maxmemory {maxmemory / mib:.0f}); {runs} runs of shop hold {held / 1000:.0f} KB, "
        f"its budget counts {counted / 1000:.0f} KB"
    )


class OneEventThenHoldUpstream(SseUpstream):
    """An upstream that sends one event, then holds the stream open (a long answer)."""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await asyncio.sleep(30)
        return response


async def test_a_stop_of_a_run_whose_keys_expire_leaves_no_key_without_ttl(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: runs of `shop` pumped by replica A; A dies (SIGKILL: a crash, the OOM killer,
    a lost node). The runs' keys stay for their TTL (window + 4 heartbeats after A's last
    heartbeat), with no end entry. Their owner (or any page of its session: a stop button,
    a retrying script) asks replica B to stop them while the keys expire. `stop_run` reads
    the run's meta (`HGETALL m` + `XREVRANGE e`: there, no end), then sends `HSET m stop 1`
    in a second round trip: when `m` expired in between, that `HSET` creates a NEW `m` hash
    (`stop=1`, no `o`/`a`) WITHOUT a TTL. Nothing ever deletes it (`meta` sees no owner:
    404; no heartbeat refreshes it), and under `volatile-lfu` it is never evicted. The same
    holds for every run whose end Redis has not recorded (`run_store_unavailable`: a failed
    write or heartbeat, an `END_RUN` refused), on any replica once the pumper forgot it, and
    even for an ended run when `HGETALL` and `XREVRANGE` straddle the expiry millisecond.

    Measured (9f91ccf, two replicas, window 2 s, heartbeat 0.25 s, 8 runs, B's stops sent by
    6 workers per run around each run's expiry, 3 tries): 7, 5 and 7 of 8 runs left their
    `m` key as `{stop: 1}` with no TTL (~1100-2000 stop requests in all). The same against
    40 ENDED (`done`) runs on one replica (8 workers per run around each expiry, 735 stops):
    none left (the straddle of `HGETALL`/`XREVRANGE` is microseconds wide).
    Fix: `request_stop` as a script that sets `stop` only when `m` exists (`HEXISTS m o`,
    or `EXISTS` then `HSET`; or `HSETNX`-free: `if redis.call('EXISTS', KEYS[1]) == 1`),
    so no command ever creates a run key without its TTL."""
    upstream = OneEventThenHoldUpstream()
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, upstream.app())
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{url}"\nresumable = true\nresume_window_seconds = 2\n',
        )
        client = redis.client()
        with GatewayProcess(env) as a, GatewayProcess(env) as b:
            sessions = [
                aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) for _ in range(4)
            ]
            for http in sessions:
                stack.push_async_callback(http.close)
            runs: list[tuple[aiohttp.ClientSession, str]] = []
            for http in sessions:
                async with http.get(f"{a.url}/apps/shop/session") as response:
                    await response.read()
                for _ in range(2):
                    response = await http.post(
                        f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "x"}
                    )
                    assert "X-Run-Id" in response.headers
                    await response.content.readuntil(b"\n\n")
                    runs.append((http, response.headers["X-Run-Id"]))
                    response.close()
            await asyncio.sleep(0.6)  # a few heartbeats
            a.kill()
            started = time.monotonic()
            expiry = {
                run_id: started + client.pttl(f"agent:aux:run:{{{run_id}}}:m".encode()) / 1000
                for _, run_id in runs
            }
            sent: dict[str, int] = dict.fromkeys(expiry, 0)

            async def hammer(http: aiohttp.ClientSession, run_id: str) -> None:
                await asyncio.sleep(max(0.0, expiry[run_id] - 0.15 - time.monotonic()))
                while time.monotonic() < expiry[run_id] + 0.3:
                    async with http.post(
                        f"{b.url}/apps/shop/runs/{run_id}/stop", headers=CSRF
                    ) as response:
                        await response.read()
                        sent[run_id] += 1

            await asyncio.gather(*(hammer(http, run_id) for http, run_id in runs for _ in range(6)))
            await asyncio.sleep(0.5)
            left = {
                key: client.hgetall(key)
                for key in client.scan_iter(match=b"*run:{*}:*", count=1000)
                if client.pttl(key) == -1
            }
    assert left == {}, (
        f"{len(left)} of {len(runs)} runs left a key without a TTL after the stops sent to B "
        f"({sum(sent.values())} stop requests around their expiry): {left}"
    )


async def test_resumes_of_an_ended_run_never_take_redis_past_maxmemory(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: one run of `shop` (within its budget: one ~4.1 MB event, counted ~5.1 MB) ends;
    its owner then sends resumes with `Last-Event-ID` at its last event, 96 at a time, for
    4 s. Each is answered 204 (nothing after it), but first `RedisRunStore.meta` reads the
    run's last entry, `XREVRANGE e + - COUNT 1`: the whole 4.1 MB event, for a 204. (The
    stop endpoint reads it the same way; the 204 is answered before the reader caps; nothing
    rate-limits either.) Redis queues those replies in the gateway's connections' output
    buffers (`client-output-buffer-limit normal 0 0 0`: unbounded), which count in
    `used_memory` against `maxmemory`: Redis goes over it, refuses every write (`noeviction`:
    other applications' sessions and runs, 503 `session_store_full`) or, under the
    recommended `volatile-lfu`, evicts other applications' sessions.

    Measured (9f91ccf, one replica, Redis `maxmemory` 96mb `noeviction`): 32 at a time:
    `used_memory` peaked at 66 MiB (40 MiB of client buffers); 96 at a time: 198 MiB
    (197 MiB of client buffers), 219 resumes answered 204 and 214 503 in 5.1 s, and 4 of 5
    new users of application `other` got 503 (the fifth: 200 without `X-Run-Id`,
    unresumable). In this test (96 at a time, 4 s, 2 tries): 621-641 answered 204, 92-96
    answered 503, Redis peaked at 359-367 MiB of 96, and `other`'s new users got 503 (4 of
    8) or an unresumable 200 (2 of 8).
    Fix: never read event data to learn a run's state: keep the end reason and the last
    sequence number in the `m` hash (written by `END_RUN`, and by the writer with each
    `XADD`), or a script returning only the last entry's id and `x` field; bound the
    replies a request can cause (rate-limit resumes and stops per session)."""
    async with AsyncExitStack() as stack:
        url, other_url = await start_upstreams(
            stack, OneBigEventUpstream().app(), CountingUpstream(count=3, delay=0.001).app()
        )
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{url}"\nresumable = true\n'
            f'[apps.other]\nupstream = "{other_url}"\nresumable = true\n',
        )
        client = redis.client()
        maxmemory = int(str(client.config_get("maxmemory")["maxmemory"]))
        with GatewayProcess(env) as gateway:
            http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            stack.push_async_callback(http.close)
            async with http.post(
                f"{gateway.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "x"}
            ) as response:
                await response.read()
                run_id = response.headers["X-Run-Id"]
            peak = 0
            polling = True

            def poll() -> None:
                nonlocal peak
                watcher = redis.client()
                while polling:
                    peak = max(peak, int(watcher.info("memory")["used_memory"]))
                    time.sleep(0.01)

            watcher = asyncio.get_running_loop().run_in_executor(None, poll)
            until = time.monotonic() + 4
            resumes: dict[int, int] = {}
            others: dict[tuple[int, bool], int] = {}

            async def resume() -> None:
                while time.monotonic() < until:
                    async with http.get(
                        f"{gateway.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "1"}
                    ) as response:
                        await response.read()
                        resumes[response.status] = resumes.get(response.status, 0) + 1

            try:
                await asyncio.gather(
                    *(resume() for _ in range(96)), other_users(gateway.url, until, others)
                )
            finally:
                polling = False
                await watcher
    mib = 2**20
    assert peak <= maxmemory and set(others) == {(200, True)}, (
        f"{resumes} answers to resumes of one ended run of shop in 4 s: Redis peaked at "
        f"{peak / mib:.0f} MiB (maxmemory {maxmemory / mib:.0f}); other's new users got "
        f"(status, resumable): {others}"
    )


class SteadyUpstream(SseUpstream):
    """An upstream that sends a small event every `delay` seconds for `seconds`."""

    def __init__(self, delay: float, seconds: float) -> None:
        self.delay = delay
        self.seconds = seconds

    async def write_events(self, response: web.StreamResponse) -> None:
        until = time.monotonic() + self.seconds
        with contextlib.suppress(ConnectionError):
            while time.monotonic() < until:
                await response.write(b"data: " + b"s" * 200 + b"\n\n")
                await asyncio.sleep(self.delay)


async def test_a_stream_recreated_after_a_redis_restart_gets_its_ttl_at_once(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack (failure combination): a run of `shop` is pumped by replica A while Redis
    restarts without persistence (or, under `volatile-lfu`, evicts the run's `e` stream, or
    fails over to a replica that lacked it). The writer's next `XADD` creates the `e` stream
    again, WITHOUT a TTL: the TTL goes only with the run's first write (`expire_ms`, consumed
    then); the next heartbeat's `PEXPIRE` would give it one. If A dies before that heartbeat
    (SIGKILL, the OOM killer; up to `RUN_HEARTBEAT_SECONDS` later), the stream stays in Redis
    for ever (and is never evicted under `volatile-lfu`), counted nowhere.

    Measured (9f91ccf, heartbeat 2 s, one event every 20 ms, A killed as soon as the stream
    reappeared; 3 tries of 3): the `e` stream left with PTTL -1, 4768 bytes, for ever.
    Fix: send the `PEXPIRE` with every writer `XADD` (same round trip: one more command per
    group commit), or an `XADD` + `PEXPIRE` script; not only with the first one."""
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, SteadyUpstream(0.02, 20).app())
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{url}"\nresumable = true\nresume_window_seconds = 2\n',
        )
        env["RUN_HEARTBEAT_SECONDS"] = "2"
        with GatewayProcess(env) as a:
            http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            stack.push_async_callback(http.close)
            response = await http.post(
                f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "x"}
            )
            run_id = response.headers["X-Run-Id"]
            key = f"agent:aux:run:{{{run_id}}}:e".encode()
            await response.content.readuntil(b"\n\n")
            await asyncio.sleep(0.3)
            redis.restart()
            client = redis.client()
            deadline = time.monotonic() + 3
            while not client.exists(key) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            reappeared = bool(client.exists(key))
            a.kill()
            response.close()
        await asyncio.sleep(3)  # past the window and the heartbeat TTL
        ttl = client.pttl(key)
        held = int(client.memory_usage(key, samples=0) or 0)
    assert ttl != -1, (
        f"after Redis restarted under run {run_id} (stream written again: {reappeared}) and "
        f"its replica died: the stream has no TTL ({ttl}), {held} bytes held for ever"
    )
