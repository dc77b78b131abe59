"""Third attack on resumable runs in Redis (branch attack-budget-3, after 4ea47cb): an end
whose earlier groups create the stream and are refused at `maxmemory` left it without a TTL.
(Its other finding, resumes from the start of ended runs with ~4 MiB entries taking Redis past
`maxmemory` through reply buffers, is open: docs/resumable-streams.md.) Fails on 4ea47cb.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from redis import exceptions as redis_errors

from app.runs.store import RedisRunStore, RunMeta
from app.sessions.backend import StoreUnavailable
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import RedisOptions, make_client
from tests.redis_server import RedisServer
from tests.runs_helpers import redis_at

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
