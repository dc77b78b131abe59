"""Third attack on resumable runs in Redis (branch attack-budget-3, after 4ea47cb): an end
whose earlier groups create the stream and are refused at `maxmemory` left it without a TTL
(fails on 4ea47cb); resumes from the start of ended runs with ~4 MiB entries took Redis past
`maxmemory` through reply buffers (fails on 1673a67).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from redis import exceptions as redis_errors

from app.runs.store import RedisRunStore, RunMeta
from app.sessions.backend import StoreUnavailable
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import RedisOptions, make_client
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer
from tests.runs_helpers import (
    CSRF,
    CountingUpstream,
    OneBigEventUpstream,
    other_users,
    redis_at,
    redis_runs_env,
    start_upstreams,
)

pytestmark = pytest.mark.redis_server


@pytest.fixture
def small_redis(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("16mb", "noeviction") as server:
        yield server


async def test_an_end_with_several_groups_refused_at_maxmemory_leaves_no_key_without_ttl(
    tier_system: None, small_redis: RedisServer
) -> None:
    """Attack: `RedisRunStore.end` writes the groups before the last with `append(...)`
    WITHOUT `expire_ms` (4ea47cb gave every writer `XADD` its `PEXPIRE`, not these), then the
    last group in `END_RUN` (which sets the TTLs). When these `XADD`s create the stream (the
    run's first write is its end: events and end read by the pump in one go, the writer never
    started; or the stream was lost, evicted under `volatile-*` or a restart, while a write was
    in flight and the next ones piled up), and Redis is just under `maxmemory`: the first
    `XADD` (300 KB, allowed: Redis checks OOM before a command) creates the stream without a
    TTL, the second is refused (OOM, `StoreFull`, never retried), `end` raises before
    `END_RUN`, nothing sets the TTL: the stream (here 300 KB; up to `resume_max_bytes` and
    more) stays in Redis forever, counted nowhere (the run's count is dropped with its
    uncounted cost after its keys' TTL).

    Measured (4ea47cb, Redis 7, `maxmemory` 16mb `noeviction`, ~800 KB free): `end` raised
    `StoreFull`, the run's `e` key: `PTTL` -1 (no TTL), 328 KB held (`MEMORY USAGE`) after
    its `m` key expired. A store-level test: through the gateway it needs the stream absent
    when an end has 3+ groups (see above); not reproduced end to end in the time given.
    Fixed: `append(..., expire_ms=ttl_ms)` in `end` too. Suggested further: every `XADD` and
    its `PEXPIRE` in one script (a lost connection between them cannot leave the key without
    a TTL either), or all the end's groups in `END_RUN`."""
    redis = small_redis
    options = RedisOptions(url=redis.url, op_timeout=2.0)
    backend = RedisBackend(make_client(options), op_timeout=2.0)
    store = RedisRunStore(backend, backend, "")
    client = redis.client()
    try:
        run_id = "A" * 22
        await store.create(
            run_id, RunMeta("owner", "shop"), ttl_ms=1500, heartbeat_ms=1000, window_ms=1000
        )
        i = 0
        try:
            while True:
                client.set(f"other:fill:{i}", b"o" * 50_000)
                i += 1
        except redis_errors.ResponseError as err:  # OOM: Redis is at maxmemory
            assert "maxmemory" in str(err)
        maxmemory = int(str(client.config_get("maxmemory")["maxmemory"]))
        j = 0
        while int(client.info("memory")["used_memory"]) > maxmemory - 800_000:
            client.delete(f"other:fill:{j}")  # ~800 KB free
            j += 1
        big = b"data: " + b"e" * 300_000 + b"\nid: 1\n\n"
        entries = [(1, big), (2, big), (3, big), (4, b"data: x\nid: 4\n\n")]
        failure = None
        try:
            await store.end(run_id, entries, 1, end_seq=5, reason="done", ttl_ms=1000)
        except StoreUnavailable as err:
            failure = err
        await asyncio.sleep(1.6)  # the run's meta key and heartbeat have expired
        events_key = store.key(run_id, "e")
        pttl = int(client.pttl(events_key))
        held = int(client.memory_usage(events_key, samples=0) or 0)
    finally:
        await backend.close()
    assert pttl != -1, (
        f"end of a run with 3 groups at maxmemory: {type(failure).__name__}: {failure}; its "
        f"events key left with PTTL {pttl} (no TTL), {held / 1000:.0f} KB held"
    )


@pytest.fixture
def redis(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("96mb", "noeviction") as server:
        yield server


async def test_resumes_from_the_start_of_ended_runs_never_take_redis_past_maxmemory(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: 8 runs of `shop` (within its budget: one ~4.1 MB event each) end; their owner
    then replays each from its start (`Last-Event-ID: 0`) with 8 readers per run (the
    per-run reader cap), 64 at a time, for 4 s. Each replay is one `XRANGE ... COUNT 1`
    whose reply is the whole 4.1 MB entry, and Redis builds each reply in the connection's
    output buffer, counted against `maxmemory`.

    Measured (1673a67, one replica, Redis `maxmemory` 96mb `noeviction`): Redis peaked at
    199-271 MiB and `other`'s new users got 503 (`session_store_full`); in this test 250 MiB
    (371 replays answered in 4 s, 2 of 8 `other` users got 503).
    Fixed: at most `RUN_CATCHUP_READS` (4) catch-up reads in flight per process: 49-54 MiB,
    534-645 whole replays (4.1 MB each) in 4 s, every `other` user 200 resumable."""
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
            run_ids = []
            for _ in range(8):
                async with http.post(
                    f"{gateway.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "x"}
                ) as response:
                    await response.read()
                    run_ids.append(response.headers["X-Run-Id"])
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
            replays: dict[int, int] = {}
            replayed_bytes = 0
            others: dict[tuple[int, bool], int] = {}

            async def replay(run_id: str) -> None:
                nonlocal replayed_bytes
                while time.monotonic() < until:
                    async with http.get(
                        f"{gateway.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "0"}
                    ) as response:
                        body = await response.read()
                        replayed_bytes += len(body)
                        replays[response.status] = replays.get(response.status, 0) + 1

            try:
                await asyncio.gather(
                    *(replay(run_id) for run_id in run_ids for _ in range(8)),
                    other_users(gateway.url, until, others),
                )
            finally:
                polling = False
                await watcher
    mib = 2**20
    # Each replay read the whole event (replays wait for the gate, they are not refused).
    assert replayed_bytes == replays.get(200, 0) * 4_100_014 > 0, (replays, replayed_bytes)
    assert peak <= maxmemory and set(others) == {(200, True)}, (
        f"{replays} answers to replays of 8 ended runs of shop in 4 s: Redis peaked at "
        f"{peak / mib:.0f} MiB (maxmemory {maxmemory / mib:.0f}); other's new users got "
        f"(status, resumable): {others}"
    )
