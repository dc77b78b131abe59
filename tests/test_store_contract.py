"""One contract for every session backend: memory, fakeredis, and a real redis-server.

The contract (app/sessions/backend.py): `get_and_touch` returns the value and slides its TTL
(GETEX EX), `peek` reads value and TTL without sliding, `create` only when absent (SET NX EX),
`compare_and_set` only when present *and* at the expected revision (a script doing SET XX EX:
a write racing a logout never resurrects, a write racing another write never overwrites it),
`delete_if_revision` likewise, `replace` only when present (SET XX GET EX: returns what it
replaced), `delete` is idempotent, entries expire after their TTL.
The memory store is also bounded: LRU eviction and an expiry sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import fakeredis
import pytest
import redis.asyncio as aioredis

from app.sessions.backend import SessionBackend, TokenBucket, revision_of
from app.sessions.memory import MemoryBackend
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import RedisOptions, make_client
from tests.conftest import STORE_KINDS, MemoryRaw, RawStore, RedisRaw
from tests.redis_server import RedisServer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Store:
    kind: str
    backend: SessionBackend
    raw: RawStore
    # Let `seconds` pass for the store: a fake clock for memory, `time.time` moved on for
    # fakeredis (it reads `time.time()` at every command), real time for a redis-server.
    advance: Callable[[float], Awaitable[None]]


@pytest.fixture(params=STORE_KINDS)
async def store(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Store]:
    kind: str = request.param
    if kind == "memory":
        clock = FakeClock()
        memory = MemoryBackend(max_entries=1000, clock=clock)

        async def advance_clock(seconds: float) -> None:
            clock.now += seconds

        yield Store(kind, memory, MemoryRaw(memory), advance_clock)
        await memory.close()
        return

    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)

    if kind == "fakeredis":
        fake = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        backend = RedisBackend(fake, op_timeout=1.0)
        skew = 0.0
        real_time = time.time

        def skewed_time() -> float:
            return real_time() + skew

        monkeypatch.setattr(time, "time", skewed_time)

        async def skew_time(seconds: float) -> None:
            nonlocal skew
            skew += seconds

        yield Store(kind, backend, RedisRaw(fake), skew_time)
        await backend.close()
        return
    server: RedisServer = request.getfixturevalue("shared_redis")
    # The production client (pool, retries, timeouts), as `open_store` builds it.
    real = RedisBackend(make_client(RedisOptions(url=server.url, op_timeout=1.0)), op_timeout=1.0)
    direct = aioredis.Redis.from_url(server.url)
    yield Store(kind, real, RedisRaw(direct), sleep)
    await real.close()
    await direct.aclose()


KEY = "agent:sess:demo:" + "A" * 43


async def test_get_missing_is_none(store: Store) -> None:
    assert await store.backend.get_and_touch(KEY, 10) is None
    assert await store.raw.keys() == []


async def test_create_only_when_absent(store: Store) -> None:
    assert await store.backend.create(KEY, b"one", 60) is True
    assert await store.backend.create(KEY, b"two", 60) is False
    assert await store.raw.get(KEY) == b"one"
    assert await store.backend.get_and_touch(KEY, 60) == b"one"


async def test_create_sets_the_ttl(store: Store) -> None:
    await store.backend.create(KEY, b"v", 60)
    ttl = await store.raw.ttl(KEY)
    assert ttl is not None and 55 < ttl <= 60


def rev(n: int, rest: str = '"data":{}}') -> bytes:
    """A stored value at revision `n` (the prefix the revision is read from)."""
    return f'{{"v":1,"r":{n},{rest}'.encode()


async def test_compare_and_set_only_when_present(store: Store) -> None:
    assert await store.backend.compare_and_set(KEY, "0", b"new", 60) == "missing"
    assert await store.raw.get(KEY) is None
    await store.backend.create(KEY, b"old", 10)  # no revision prefix: revision 0
    assert await store.backend.compare_and_set(KEY, "0", rev(1), 60) == "ok"
    assert await store.raw.get(KEY) == rev(1)
    ttl = await store.raw.ttl(KEY)
    assert ttl is not None and 55 < ttl <= 60  # every save sets the TTL again


async def test_compare_and_set_only_at_the_expected_revision(store: Store) -> None:
    await store.backend.create(KEY, rev(7), 60)
    assert await store.backend.compare_and_set(KEY, "6", rev(8, '"x":1}'), 60) == "conflict"
    assert await store.backend.compare_and_set(KEY, "0", rev(8, '"x":1}'), 60) == "conflict"
    assert await store.backend.compare_and_set(KEY, "70", rev(8, '"x":1}'), 60) == "conflict"
    assert await store.raw.get(KEY) == rev(7), "a refused write changed the value"
    assert await store.backend.compare_and_set(KEY, "7", rev(8, '"x":2}'), 60) == "ok"
    assert await store.raw.get(KEY) == rev(8, '"x":2}')
    # The next writer must now expect 8: the one that also loaded 7 loses.
    assert await store.backend.compare_and_set(KEY, "7", rev(8, '"x":3}'), 60) == "conflict"
    assert await store.raw.get(KEY) == rev(8, '"x":2}')


@pytest.mark.parametrize(
    ("value", "revision"),
    [
        (b'{"v":1,"r":42,"data":{}}', "42"),
        (b'{"v":1,"r":123456789012345678901234567890,"enc":"x"}', "123456789012345678901234567890"),
        (b'{"v": 1, "r": 42, "data": {}}', "0"),  # not the canonical prefix
        (b'{"r":42,"v":1,"data":{}}', "0"),
        (b'{"v":1,"data":{},"gw":{}}', "0"),  # written before revisions existed
        (b"\xff\xfe garbage", "0"),
        (b"", "0"),
    ],
)
async def test_the_store_reads_revisions_like_python(
    store: Store, value: bytes, revision: str
) -> None:
    """The Lua pattern and `revision_of` agree on every value (else every CAS would loop)."""
    assert revision_of(value) == revision
    await store.raw.set(KEY, value, 60)
    wrong = "1" if revision != "1" else "2"
    assert await store.backend.compare_and_set(KEY, wrong, b"x", 60) == "conflict"
    assert await store.backend.compare_and_set(KEY, revision, b"x", 60) == "ok"


async def test_compare_and_set_after_delete_does_not_resurrect(store: Store) -> None:
    await store.backend.create(KEY, rev(1), 60)
    await store.backend.delete(KEY)
    assert await store.backend.compare_and_set(KEY, "1", rev(2), 60) == "missing"
    assert await store.raw.get(KEY) is None
    assert await store.backend.get_and_touch(KEY, 60) is None


async def test_delete_if_revision(store: Store) -> None:
    assert await store.backend.delete_if_revision(KEY, "0") == "missing"
    await store.backend.create(KEY, rev(3), 60)
    assert await store.backend.delete_if_revision(KEY, "2") == "conflict"
    assert await store.raw.get(KEY) == rev(3)
    assert await store.backend.delete_if_revision(KEY, "3") == "ok"
    assert await store.raw.get(KEY) is None


async def test_delete_unless_revision(store: Store) -> None:
    assert await store.backend.delete_unless_revision(KEY, "7") == "missing"
    await store.backend.create(KEY, rev(7), 60)
    assert await store.backend.delete_unless_revision(KEY, "7") == "conflict"
    assert await store.raw.get(KEY) == rev(7)
    assert await store.backend.delete_unless_revision(KEY, "8") == "ok"
    assert await store.raw.get(KEY) is None
    await store.backend.create(KEY, b"no revision prefix", 60)  # revision "0"
    assert await store.backend.delete_unless_revision(KEY, "7") == "ok"
    assert await store.raw.get(KEY) is None


async def test_replace_returns_the_value_it_replaced_and_never_creates(store: Store) -> None:
    assert await store.backend.replace(KEY, b"tomb", 60) is None
    assert await store.raw.get(KEY) is None, "replace created a key"
    await store.backend.create(KEY, rev(3), 600)
    assert await store.backend.replace(KEY, b"tomb", 2) == rev(3)
    assert await store.raw.get(KEY) == b"tomb"
    ttl = await store.raw.ttl(KEY)
    assert ttl is not None and 0 < ttl <= 2, "the TTL is the replacement's"
    # Blind: whatever the revision (a rotation's tombstone must land whatever raced it).
    assert await store.backend.replace(KEY, rev(9), 1) == b"tomb"
    await store.advance(1.1)
    assert await store.backend.replace(KEY, b"late", 60) is None
    assert await store.raw.get(KEY) is None


async def test_peek_reads_without_sliding(store: Store) -> None:
    assert await store.backend.peek(KEY) is None
    await store.backend.create(KEY, b"v", 60)
    await store.advance(1.1)
    found = await store.backend.peek(KEY)
    assert found is not None
    value, left = found
    assert value == b"v"
    assert left is not None and 57 < left < 59.5
    ttl = await store.raw.ttl(KEY)
    assert ttl is not None and ttl < 59.5, "peek slid the TTL"


async def test_expire_sets_the_ttl_of_an_existing_key_only(store: Store) -> None:
    await store.backend.expire(KEY, 30)  # absent: nothing happens
    assert await store.raw.get(KEY) is None
    await store.backend.create(KEY, b"v", 600)
    await store.backend.expire(KEY, 30)
    ttl = await store.raw.ttl(KEY)
    assert ttl is not None and 25 < ttl <= 30
    assert await store.raw.get(KEY) == b"v"


async def test_delete_is_idempotent(store: Store) -> None:
    await store.backend.delete(KEY)  # absent: no error
    await store.backend.create(KEY, b"v", 60)
    await store.backend.delete(KEY)
    await store.backend.delete(KEY)
    assert await store.raw.get(KEY) is None


async def test_delete_touches_only_its_key(store: Store) -> None:
    other = KEY.replace("demo", "shop")
    await store.backend.create(KEY, b"a", 60)
    await store.backend.create(other, b"b", 60)
    await store.backend.delete(KEY)
    assert await store.raw.get(other) == b"b"


async def test_get_and_touch_slides_the_ttl(store: Store) -> None:
    await store.backend.create(KEY, b"v", 10)
    assert await store.backend.get_and_touch(KEY, 600) == b"v"
    ttl = await store.raw.ttl(KEY)
    assert ttl is not None and 590 < ttl <= 600


async def test_get_and_touch_keeps_an_entry_alive_past_its_first_ttl(store: Store) -> None:
    # Timings leave room for fakeredis, whose GETEX truncates the new deadline to whole seconds.
    await store.backend.create(KEY, b"v", 2)
    await store.advance(1.5)
    assert await store.backend.get_and_touch(KEY, 2) == b"v"
    await store.advance(0.8)  # 2.3 s after create (past its first TTL), 0.8 s after the touch
    assert await store.backend.get_and_touch(KEY, 2) == b"v"


async def test_entries_expire(store: Store) -> None:
    await store.backend.create(KEY, b"v", 1)
    await store.advance(1.2)
    assert await store.backend.get_and_touch(KEY, 1) is None
    assert await store.backend.compare_and_set(KEY, "0", b"late", 60) == "missing"
    assert await store.raw.get(KEY) is None
    # An expired key is absent: it can be created again.
    assert await store.backend.create(KEY, b"again", 60) is True


async def test_values_are_opaque_bytes(store: Store) -> None:
    value = bytes(range(256))
    await store.backend.create(KEY, value, 60)
    assert await store.backend.get_and_touch(KEY, 60) == value


async def test_ping(store: Store) -> None:
    await store.backend.ping()


async def test_a_key_of_another_type_is_no_session_and_removed(store: Store) -> None:
    """Someone else's non-string key under our prefix must not turn into a 503 forever."""
    if store.kind == "memory":
        return  # the memory store holds only bytes
    assert isinstance(store.raw, RedisRaw)
    await store.raw.client.hset(KEY, "field", "value")
    assert await store.backend.get_and_touch(KEY, 60) is None
    assert await store.raw.get(KEY) is None
    await store.raw.client.hset(KEY, "field", "value")
    assert await store.backend.delete_unless_revision(KEY, "1") == "ok"  # a logout: 204
    assert await store.raw.get(KEY) is None


# -- rate_limit: GCRA token buckets ----------------------------------------------------------

BUCKET_KEY = "agent:aux:rl:{t}:k"


async def test_rate_limit_is_a_token_bucket(store: Store) -> None:
    """3/60 s: a burst of 3, then the wait until the next token (20 s, on the store's clock)."""
    bucket = [TokenBucket(BUCKET_KEY, 3, 60)]
    assert [await store.backend.rate_limit(bucket) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = await store.backend.rate_limit(bucket)
    assert 19.0 < wait <= 20.0
    if store.kind != "memory":  # the bucket expires once it is full again
        ttl = await store.raw.ttl(BUCKET_KEY)
        assert ttl is not None and 0 < ttl <= 60


async def test_rate_limit_refused_by_one_bucket_takes_from_none(store: Store) -> None:
    tight, loose = (
        TokenBucket("agent:aux:rl:{t}:a", 1, 60),
        TokenBucket("agent:aux:rl:{t}:b", 3, 60),
    )
    assert await store.backend.rate_limit([tight, loose]) == 0.0
    assert await store.backend.rate_limit([tight, loose]) > 0  # refused by `tight`
    # `loose` lost one token (the first call), not two.
    assert [await store.backend.rate_limit([loose]) for _ in range(2)] == [0.0, 0.0]
    assert await store.backend.rate_limit([loose]) > 0


async def test_rate_limit_tokens_come_back_at_the_rate() -> None:
    clock = FakeClock()
    memory = MemoryBackend(clock=clock)
    bucket = [TokenBucket("k", 3, 60)]
    assert [await memory.rate_limit(bucket) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert await memory.rate_limit(bucket) == pytest.approx(20.0)
    clock.now += 19.9
    assert await memory.rate_limit(bucket) == pytest.approx(0.1)
    clock.now += 0.1
    assert await memory.rate_limit(bucket) == 0.0
    clock.now += 600  # idle for long: a full burst again, never more
    assert [await memory.rate_limit(bucket) for _ in range(4)][-1] > 0


async def test_memory_rate_limit_buckets_are_bounded() -> None:
    """At most `max_entries` buckets: the oldest goes first (and comes back full)."""
    clock = FakeClock()
    memory = MemoryBackend(max_entries=10, clock=clock)
    first = [TokenBucket("k0", 1, 60)]
    assert await memory.rate_limit(first) == 0.0
    assert await memory.rate_limit(first) > 0
    for i in range(1, 1000):
        assert await memory.rate_limit([TokenBucket(f"k{i}", 1, 60)]) == 0.0
    assert await memory.rate_limit(first) == 0.0  # evicted: a full bucket again


# -- memory only: bounded -------------------------------------------------------------------


async def test_memory_store_is_bounded_lru() -> None:
    clock = FakeClock()
    memory = MemoryBackend(max_entries=3, clock=clock)
    for name in "abc":
        assert await memory.create(name, name.encode(), 60)
    # Reading `a` makes it the most recently used: `b` is evicted next.
    assert await memory.get_and_touch("a", 60) == b"a"
    assert await memory.create("d", b"d", 60)
    assert len(memory) == 3
    assert memory.evictions == 1
    assert await memory.get_and_touch("b", 60) is None
    for name in "acd":
        assert await memory.get_and_touch(name, 60) == name.encode()
    # An update also counts as use.
    assert await memory.compare_and_set("a", "0", b"a2", 60) == "ok"
    assert await memory.create("e", b"e", 60)
    assert await memory.get_and_touch("c", 60) is None
    assert await memory.get_and_touch("a", 60) == b"a2"
    assert len(memory) == 3


async def test_memory_flood_stays_bounded() -> None:
    memory = MemoryBackend(max_entries=100)
    for i in range(5000):
        await memory.create(f"k{i}", b"x", 60)
    assert len(memory) == 100
    assert memory.evictions == 4900


async def test_memory_sweep_drops_expired_entries() -> None:
    clock = FakeClock()
    memory = MemoryBackend(max_entries=100, clock=clock)
    await memory.create("short", b"s", 10)
    await memory.create("long", b"l", 100)
    assert memory.sweep() == 0
    clock.now += 11
    assert len(memory) == 2  # expired but not yet swept
    assert memory.sweep() == 1
    assert len(memory) == 1
    assert await memory.get_and_touch("long", 100) == b"l"


async def test_memory_sweeps_in_the_background_until_closed() -> None:
    clock = FakeClock()
    memory = MemoryBackend(max_entries=100, clock=clock)
    for i in range(10):
        await memory.create(f"k{i}", b"x", 5)
    memory.start_sweeping(0.01)
    clock.now += 6
    async with asyncio.timeout(5):
        while len(memory):
            await asyncio.sleep(0.01)
    await memory.close()
    # Closed: the sweeper task is gone.
    with contextlib.suppress(AttributeError):
        assert memory._sweeper is None


async def test_memory_expired_entry_is_invisible_before_any_sweep() -> None:
    clock = FakeClock()
    memory = MemoryBackend(clock=clock)
    await memory.create("k", b"v", 10)
    clock.now += 10  # exactly at the deadline: gone, like Redis
    assert await memory.get_and_touch("k", 10) is None
    assert await MemoryRaw(memory).ttl("k") is None
