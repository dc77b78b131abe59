"""Issue 12 row 10: session floods.

(a) The memory store is bounded by bytes (`MEMORY_MAX_BYTES`), not only by count: a flood of
    cookieless 64 KB PATCHes keeps the stored bytes under the bound, evicting least recently
    used sessions (one-shot ones first), and a real process's RSS stays near the bound.
(b) Session *creation* is limited per client address (`SESSION_CREATE_RATE`, trusted-proxy
    aware, IPv6 per /64, shared through Redis): over it, 429 `rate_limited` with `Retry-After`
    and nothing is created; existing sessions and reads are never limited.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time

import aiohttp
import pytest

from app.applications import RateLimit
from app.config import ConfigError, Settings
from app.creation_limit import client_bucket
from app.sessions.memory import ENTRY_OVERHEAD_BYTES, MemoryBackend
from tests.conftest import CSRF, Gateway, GatewayFactory, RedisRaw
from tests.fake_upstream import ServedUpstream, app_settings, run_gateway
from tests.gateway_process import GatewayProcess, run_gateway_to_exit
from tests.redis_server import RedisServer

SESSION = "/apps/demo/session"
PROXY = {"TRUSTED_PROXIES": "127.0.0.1/32"}  # the test client plays a trusted proxy
MIB = 1024 * 1024


def from_ip(address: str) -> dict[str, str]:
    return {**CSRF, "X-Forwarded-For": address}


async def sessions_stored(gw: Gateway) -> int:
    return sum(k.startswith(gw.settings.redis_prefix) for k in await gw.raw.keys())


async def cookieless_patch(
    gw: Gateway, headers: dict[str, str], data: object
) -> aiohttp.ClientResponse:
    gw.client.session.cookie_jar.clear()
    resp = await gw.client.patch(SESSION, json=data, headers=headers)
    await resp.read()
    return resp


# -- (b) the creation limit -------------------------------------------------------------------


def test_client_buckets() -> None:
    assert client_bucket("203.0.113.7") == "203.0.113.7"
    assert client_bucket("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_bucket("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_bucket("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert client_bucket("fe80::1%eth0") == "fe80::/64"
    assert client_bucket("127.0.0.1") is None
    assert client_bucket("::1") is None
    assert client_bucket("::ffff:127.0.0.1") is None
    assert client_bucket("") == "unknown"


async def test_new_sessions_over_the_limit_are_429_and_nothing_is_created(
    gateway_factory: GatewayFactory, kind: str
) -> None:
    gw = await gateway_factory(kind, PROXY, SESSION_CREATE_RATE="5/minute")
    for i in range(5):
        resp = await cookieless_patch(gw, from_ip("203.0.113.7"), {"i": i})
        assert resp.status == 200, i
    kept = gw.session_id()
    assert kept is not None
    resp = await cookieless_patch(gw, from_ip("203.0.113.7"), {"i": 5})
    assert resp.status == 429
    body = await resp.json()
    assert body["error"]["code"] == "rate_limited"
    assert 1 <= int(resp.headers["Retry-After"]) <= 12
    assert "Set-Cookie" not in resp.headers
    assert await sessions_stored(gw) == 5
    # Another address has its own bucket; reads and existing sessions are never limited.
    assert (await cookieless_patch(gw, from_ip("203.0.113.8"), {"i": 6})).status == 200
    gw.client.session.cookie_jar.clear()
    cookie = {"Cookie": f"{gw.settings.cookie_name}={kept}"}
    for i in range(10):
        resp = await gw.client.patch(
            SESSION, json={"n": i}, headers={**from_ip("203.0.113.7"), **cookie}
        )
        assert resp.status == 200
        resp = await gw.client.get(SESSION, headers={"X-Forwarded-For": "203.0.113.7"})
        assert resp.status == 200
    assert await sessions_stored(gw) == 6


async def test_the_limit_is_per_client_address_behind_the_trusted_proxy_only(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory("memory", PROXY, SESSION_CREATE_RATE="2/minute")
    # A client cannot escape its bucket by writing its own X-Forwarded-For: the proxy appends
    # the real address, and the last untrusted hop is what counts.
    for i in range(2):
        resp = await cookieless_patch(gw, from_ip(f"198.51.100.{i}, 203.0.113.7"), {"i": i})
        assert resp.status == 200
    resp = await cookieless_patch(gw, from_ip("198.51.100.9, 203.0.113.7"), {"i": 9})
    assert resp.status == 429
    # IPv6: one bucket per /64.
    for i in range(2):
        resp = await cookieless_patch(gw, from_ip(f"2001:db8:7:7::{i + 1}"), {"i": i})
        assert resp.status == 200
    assert (
        await cookieless_patch(gw, from_ip("2001:db8:7:7:ffff::9"), {})
    ).status == 200  # {}: nothing to create
    assert (await cookieless_patch(gw, from_ip("2001:db8:7:7:ffff::9"), {"a": 1})).status == 429
    assert (await cookieless_patch(gw, from_ip("2001:db8:7:8::1"), {"a": 1})).status == 200


async def test_loopback_clients_and_off_are_not_limited(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory("memory", SESSION_CREATE_RATE="2/minute")
    for i in range(10):  # the test client itself: loopback
        assert (await cookieless_patch(gw, CSRF, {"i": i})).status == 200
    gw = await gateway_factory("memory", PROXY, SESSION_CREATE_RATE="off")
    for i in range(100):
        assert (await cookieless_patch(gw, from_ip("203.0.113.7"), {"i": i})).status == 200


async def test_a_first_agent_request_over_the_limit_is_429_before_the_upstream(
    upstream: ServedUpstream,
) -> None:
    env = {**PROXY, "SESSION_CREATE_RATE": "3/minute"}
    async with run_gateway(app_settings(upstream.base, env)) as gw:
        for _ in range(3):
            gw.client.cookie_jar.clear()
            async with gw.client.post(
                "/apps/shop/agent/chat", json={}, headers=from_ip("203.0.113.7")
            ) as resp:
                assert resp.status == 200
        gw.client.cookie_jar.clear()
        async with gw.client.post(
            "/apps/shop/agent/chat", json={}, headers=from_ip("203.0.113.7")
        ) as resp:
            assert resp.status == 429
            assert "Set-Cookie" not in resp.headers
            assert (await resp.json())["error"]["code"] == "rate_limited"
        assert len(upstream.fake.seen) == 3


async def test_the_limit_is_shared_by_replicas_on_redis(
    gateway_factory: GatewayFactory, shared_redis: RedisServer
) -> None:
    env = {**PROXY, "SESSION_CREATE_RATE": "4/minute", "REDIS_URL": shared_redis.url}
    one = await gateway_factory("redis", env)
    two = await gateway_factory("redis", env)
    statuses = []
    for i in range(6):
        gw = one if i % 2 else two
        statuses.append((await cookieless_patch(gw, from_ip("203.0.113.7"), {"i": i})).status)
    assert statuses == [200, 200, 200, 200, 429, 429]
    with shared_redis.client() as client:
        assert client.exists("agent:aux:rl:create:203.0.113.7")
        assert 0 < client.pttl("agent:aux:rl:create:203.0.113.7") <= 60_000


async def test_a_flood_from_one_address_creates_only_the_burst(
    gateway_factory: GatewayFactory, kind: str
) -> None:
    """500 concurrent cookieless PATCHes of 4 KB from one address with the default limit
    (60/minute): 60 sessions, plus one a second while the flood lasts; the rest 429."""
    gw = await gateway_factory(kind, PROXY)
    started = time.monotonic()

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:

        async def one() -> int:
            async with http.patch(
                gw.client.make_url(SESSION),
                json={"pad": "x" * 4096},
                headers=from_ip("203.0.113.7"),
            ) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(500)))
    elapsed = time.monotonic() - started
    created = statuses.count(200)
    assert statuses.count(429) == 500 - created
    assert 60 <= created <= 60 + elapsed + 1, (created, elapsed)
    assert await sessions_stored(gw) == created


async def test_a_bucket_the_store_refuses_lets_creations_through(
    gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await gateway_factory("fakeredis", PROXY, SESSION_CREATE_RATE="1/minute")
    assert isinstance(gw.raw, RedisRaw)
    await gw.raw.client.hset("agent:aux:rl:create:203.0.113.7", "x", "1")  # WRONGTYPE
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            assert (await cookieless_patch(gw, from_ip("203.0.113.7"), {"i": i})).status == 200
    assert sum("limit not checked" in r.getMessage() for r in caplog.records) == 1


async def test_a_store_outage_is_one_503_not_two_waits(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    """The buckets live in the session store: when it is down a new session is refused with
    503 after one operation deadline, not after the limit's and then the write's."""
    gw = await gateway_factory(
        "redis",
        PROXY,
        REDIS_URL=redis_server.url,
        REDIS_OP_TIMEOUT_SECONDS="1",
        REDIS_SOCKET_TIMEOUT_SECONDS="1",  # a frozen Redis: each operation takes its deadline
    )
    assert (await cookieless_patch(gw, from_ip("203.0.113.7"), {"a": 1})).status == 200
    redis_server.pause()
    try:
        started = time.monotonic()
        resp = await cookieless_patch(gw, from_ip("203.0.113.7"), {"a": 2})
        elapsed = time.monotonic() - started
    finally:
        redis_server.resume()
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "session_store_unavailable"
    assert 0.9 < elapsed < 1.5, elapsed


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", RateLimit(60, 60)),
        ("off", None),
        ("0", None),
        ("OFF", None),
        ("10/second", RateLimit(10, 1)),
    ],
)
def test_the_setting(value: str, expected: RateLimit | None) -> None:
    settings = Settings.from_env({"SESSION_CREATE_RATE": value}, dotenv_path=None)
    assert settings.session_create_rate == expected


@pytest.mark.system
def test_a_bad_setting_stops_a_real_process_with_exit_2() -> None:
    code, stderr, _ = run_gateway_to_exit({"SESSION_CREATE_RATE": "lots"})
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SESSION_CREATE_RATE='lots' is not valid" in lines[0], stderr


# -- (a) the memory store's byte bound ----------------------------------------------------------


def cost(backend: MemoryBackend) -> int:
    return sum(
        len(k) + len(raw) + ENTRY_OVERHEAD_BYTES
        for segment in (backend._probation, backend._protected)
        for k, raw in segment.items()
    )


async def test_the_byte_count_is_exact_through_every_operation() -> None:
    now = [1000.0]
    memory = MemoryBackend(max_entries=50, max_bytes=40_000, clock=lambda: now[0])
    rng = random.Random(12)
    keys = [f"k{i}" for i in range(80)]
    for _ in range(5000):
        key = rng.choice(keys)
        value = b'{"v":1,"r":1,"data":' + b"x" * rng.randrange(2000) + b"}"
        op = rng.randrange(9)
        if op == 0:
            await memory.create(key, value, rng.choice((1, 60)))
        elif op == 1:
            await memory.get_and_touch(key, 60)
        elif op == 2:
            await memory.compare_and_set(key, "1", value, 60)
        elif op == 3:
            await memory.delete(key)
        elif op == 4:
            await memory.expire(key, rng.choice((1, 60)))
        elif op == 5:
            now[0] += rng.choice((0.0, 0.5, 2.0))
        elif op == 6:
            memory.sweep()
        elif op == 7:
            await memory.replace(key, b'{"v":1,"r":1000000000000000000,"rotated":"n"}', 60)
        else:
            await memory.peek(key)
        assert memory.bytes == cost(memory)
        assert memory.bytes <= 40_000
    await memory.close()
    assert memory.bytes == 0


async def test_the_bound_evicts_one_shot_sessions_before_used_ones() -> None:
    memory = MemoryBackend(max_entries=100_000, max_bytes=1_000_000)
    assert await memory.create("alice", b"a" * 1000, 60)
    assert await memory.get_and_touch("alice", 60) is not None  # used: protected
    for i in range(200):
        assert await memory.create(f"anon{i}", b"x" * 60_000, 60)
        assert memory.bytes <= 1_000_000
    assert await memory.get_and_touch("alice", 60) is not None
    assert await memory.get_and_touch("anon199", 60) is not None
    assert await memory.get_and_touch("anon0", 60) is None


async def test_a_flood_of_64_kb_sessions_stays_under_the_bound_through_http(
    gateway_factory: GatewayFactory,
) -> None:
    bound = 4 * MIB
    gw = await gateway_factory("memory", MEMORY_MAX_BYTES=str(bound), SESSION_CREATE_RATE="off")
    resp = await gw.client.patch(SESSION, json={"user": "alice"}, headers=CSRF)
    assert resp.status == 200
    alice = gw.session_id()
    resp = await gw.client.get(SESSION)  # alice uses her session: protected
    assert (await resp.json())["data"] == {"user": "alice"}
    pad = "x" * (64 * 1024 - 200)
    for i in range(200):  # ~12.8 MB of sessions, 3x the bound
        assert (await cookieless_patch(gw, CSRF, {"i": i, "pad": pad})).status == 200
    memory = gw.backend
    assert isinstance(memory, MemoryBackend)
    assert memory.bytes <= bound
    assert memory.bytes == cost(memory)
    assert 55 <= len(memory) <= 66  # ~4 MiB / 64 KB
    resp = await gw.client.get("/metrics")
    exported = re.search(r"^agent_bff_memory_session_bytes (\S+)$", await resp.text(), re.M)
    assert exported is not None and float(exported.group(1)) == memory.bytes
    gw.client.session.cookie_jar.clear()
    resp = await gw.client.get(SESSION, headers={"Cookie": f"{gw.settings.cookie_name}={alice}"})
    assert (await resp.json())["data"] == {"user": "alice"}


def test_memory_max_bytes_setting() -> None:
    assert Settings.from_env({}, dotenv_path=None).memory_max_bytes == 256 * MIB
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"MEMORY_MAX_BYTES": str(MIB)}, dotenv_path=None)
    assert info.value.problems[0].startswith(
        "MEMORY_MAX_BYTES=1048576 is too small for SESSION_MAX_BYTES=65536"
    )
    small = Settings.from_env(
        {"MEMORY_MAX_BYTES": str(MIB), "SESSION_MAX_BYTES": "16384"}, dotenv_path=None
    )
    assert small.memory_max_bytes == MIB


# -- (a) a real process's RSS -------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def flood(url: str, count: int, size: int, concurrency: int = 16) -> list[int]:
    """`count` cookieless PATCHes of about `size` bytes each, `concurrency` at a time."""
    body = ('{"pad": "' + "x" * (size - 12) + '"}').encode()
    statuses: list[int] = []
    queue = iter(range(count))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:

        async def worker() -> None:
            for _ in queue:
                async with http.patch(
                    f"{url}{SESSION}",
                    data=body,
                    headers={**CSRF, "Content-Type": "application/json"},
                ) as resp:
                    await resp.read()
                    statuses.append(resp.status)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


@pytest.mark.system
def test_a_real_process_stays_near_its_memory_bound_under_a_64_kb_flood() -> None:
    """3,000 cookieless PATCHes of 64 KB (~190 MB of sessions) against MEMORY_MAX_BYTES=48 MiB:
    the process grows by the bound plus what requests and the allocator hold, not by 190 MB."""
    bound = 48 * MIB
    env = {"MEMORY_MAX_BYTES": str(bound), "SESSION_CREATE_RATE": "off", "LOG_LEVEL": "warning"}
    with GatewayProcess(env) as proc:
        asyncio.run(flood(proc.url, 50, 65_000))  # warm-up: code paths, buffers
        before = rss_bytes(proc.pid)
        statuses = asyncio.run(flood(proc.url, 3000, 65_000))
        after = rss_bytes(proc.pid)
    assert statuses.count(200) == 3000
    growth = after - before
    # The bound, plus 24 MiB for buffers in flight and allocator slack.
    print(f"RSS {before / MIB:.1f} -> {after / MIB:.1f} MiB (+{growth / MIB:.1f})")
    assert growth < bound + 24 * MIB, growth / MIB


# -- (c) Redis maxmemory-policy for sessions ----------------------------------------------------


@pytest.mark.parametrize("policy", ["volatile-lfu", "noeviction"])
async def test_a_flood_past_redis_maxmemory_evicts_instead_of_refusing_writes(
    gateway_factory: GatewayFactory, redis_server: RedisServer, policy: str
) -> None:
    """A flood from many addresses (the creation limit cannot help: off here) past `maxmemory`:
    with the documented `volatile-lfu` every write keeps working (one-shot flood sessions are
    evicted, an actively used session stays); with `noeviction` writes fail with 503
    `session_store_full` for everybody."""
    gw = await gateway_factory(
        "redis", REDIS_URL=redis_server.url, SESSION_CREATE_RATE="off", REDIS_OP_TIMEOUT_SECONDS="2"
    )
    with redis_server.client() as admin:
        admin.config_set("maxmemory-policy", policy)
        admin.config_set("maxmemory", str(12 * MIB))
    try:
        resp = await gw.client.patch(SESSION, json={"user": "alice"}, headers=CSRF)
        assert resp.status == 200
        alice = gw.session_id()
        pad = "x" * 60_000
        statuses: list[int] = []
        alice_reads: list[dict[str, object]] = []
        for i in range(400):  # ~24 MB of one-shot sessions: twice maxmemory
            statuses.append((await cookieless_patch(gw, CSRF, {"i": i, "pad": pad})).status)
            if i % 10 == 0:
                gw.client.session.cookie_jar.clear()
                cookie = {"Cookie": f"{gw.settings.cookie_name}={alice}"}
                resp = await gw.client.get(SESSION, headers=cookie)
                alice_reads.append((await resp.json()).get("data", {}))
        with redis_server.client() as admin:
            evicted = int(admin.info("stats")["evicted_keys"])
    finally:
        with redis_server.client() as admin:
            admin.config_set("maxmemory", "0")
    if policy == "noeviction":
        assert statuses.count(503) > 100
        assert evicted == 0
        return
    assert statuses == [200] * 400
    assert evicted > 100
    assert all(data == {"user": "alice"} for data in alice_reads), alice_reads
