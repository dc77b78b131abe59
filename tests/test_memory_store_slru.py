"""Memory store: segmented LRU (a flood of one-shot sessions cannot evict the sessions people
use; review-1 item 4) and a bounded footprint per entry."""

from __future__ import annotations

import tracemalloc

from app.sessions.memory import MemoryBackend
from tests.conftest import GatewayFactory

CSRF = {"X-CSRF": "1", "Content-Type": "application/json"}


async def test_used_session_survives_a_flood_of_one_shot_sessions() -> None:
    memory = MemoryBackend(max_entries=10)
    assert await memory.create("alice", b"a", 60)
    assert await memory.get_and_touch("alice", 60) == b"a"  # used again: protected
    for i in range(1000):
        assert await memory.create(f"anon{i}", b"x", 60)
    assert len(memory) == 10
    assert await memory.get_and_touch("alice", 60) == b"a"
    # The flood evicted itself, oldest first.
    assert await memory.get_and_touch("anon0", 60) is None
    assert await memory.get_and_touch("anon999", 60) == b"x"


async def test_protected_segment_is_bounded_and_demotes_its_least_recently_used() -> None:
    memory = MemoryBackend(max_entries=10)  # protected: at most 8
    for i in range(10):
        assert await memory.create(f"u{i}", b"u", 60)
        assert await memory.get_and_touch(f"u{i}", 60) == b"u"
    # u0 and u1 were demoted to probation when u8 and u9 were promoted: they go first.
    assert await memory.create("new", b"n", 60)
    assert await memory.get_and_touch("u0", 60) is None
    for i in range(1, 10):
        assert await memory.get_and_touch(f"u{i}", 60) == b"u"


async def test_rotation_tombstones_do_not_push_used_sessions_out() -> None:
    """`replace` (a rotation's tombstone at the old id) is not a use: the tombstone goes to
    probation, so a flood of rotations evicts tombstones, never the protected sessions."""
    memory = MemoryBackend(max_entries=10)  # protected: at most 8
    for i in range(8):
        assert await memory.create(f"u{i}", b"u", 60)
        assert await memory.get_and_touch(f"u{i}", 60) == b"u"
    tombstones = 0
    for n in range(100):  # one session rotated again and again: new key, tombstone at the old
        assert await memory.create(f"r{n + 1}", b"r", 60)
        tombstones += await memory.replace(f"r{n}", b"tomb", 60) is not None
    assert tombstones > 0
    for i in range(8):
        assert await memory.get_and_touch(f"u{i}", 60) == b"u", f"u{i} was evicted"


async def test_entries_stay_small() -> None:
    memory = MemoryBackend(max_entries=100_000)
    count = 20_000
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(count):
        # A gateway-shaped key (59 characters) and a 248-byte value, one object each.
        await memory.create(f"agent:sess:demo:{i:043d}", i.to_bytes(4) * 62, 60)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_entry = (after - before) / count
    # Key, value (+ 4 bytes of expiry) and the dict slot: ~405 bytes. An OrderedDict of
    # `str -> (value, expiry)` tuples took ~535.
    assert per_entry < 450, per_entry


async def test_review_item_4_flood_of_cookieless_requests_keeps_an_active_session(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory("memory", MEMORY_MAX_SESSIONS="10")
    response = await gw.client.patch("/apps/demo/session", json={"user": "alice"}, headers=CSRF)
    assert response.status == 200
    response = await gw.client.get("/apps/demo/session")  # alice keeps using her session
    assert (await response.json())["data"] == {"user": "alice"}
    cookie = gw.session_id()
    assert cookie is not None
    for _ in range(12):  # one-shot anonymous sessions: a fresh client each time (no cookie)
        gw.client.session.cookie_jar.clear()
        response = await gw.client.patch("/apps/demo/session", json={"n": 1}, headers=CSRF)
        assert response.status == 200
    gw.client.session.cookie_jar.clear()
    response = await gw.client.get(
        "/apps/demo/session", headers={"Cookie": f"{gw.settings.cookie_name}={cookie}"}
    )
    assert (await response.json())["data"] == {"user": "alice"}
