"""The spec's "automatic reconnection with exponential backoff; maximum 3 retries per request",
proven on real servers for every topology (plain, Sentinel, Cluster).

One failed store operation is exactly 1 + 3 attempts, each making at most one connection,
with growing, jittered sleeps between them, all within `REDIS_OP_TIMEOUT_SECONDS`; the error
names the real cause and the number of attempts; a Redis that answers again within the budget
makes the operation succeed with nothing visible; errors another try cannot cure are not
retried. Attempts are counted where they arrive: at a TCP proxy in front of the server
(`CountingProxy`), or in `INFO stats rejected_connections` of a server whose only client slot
the test holds (`CONFIG SET maxclients`).

Before the fix redis-py's nested retry loops made up to 16 connection attempts per operation
(7 within the 2 s deadline, reported only as "no answer within the deadline"), and the
cluster client retried without any sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from app.config import Settings
from app.sessions.backend import StoreUnavailable, TokenBucket
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import RedisOptions, make_client
from app.sessions.redis_retry import BACKOFF_BASE, BACKOFF_CAP, RETRIES, backoff_delay
from tests.conftest import CSRF, GatewayFactory
from tests.fault_proxy import FaultProxy
from tests.redis_server import RedisServer
from tests.redis_topologies import RedisClusterTopology, SentinelTopology, command
from tests.test_redis_outage import FAST_FAIL_BOUND, PRODUCTION_BUDGET

pytestmark = pytest.mark.redis_server

SESSION = "/apps/demo/session"
PRODUCTION_OP_TIMEOUT = Settings.from_env({}, dotenv_path=None).redis_op_timeout_seconds
# Tiny sleeps (base, cap) for the tests that only count attempts (the production ones are
# timed below).
FAST_BACKOFF = (0.01, 0.04)
# The shortest possible sleep after the n-th failure: half of min(cap, base * 2**n).
MIN_SLEEPS = [min(BACKOFF_CAP, BACKOFF_BASE * 2**n) / 2 for n in range(1, RETRIES + 1)]


class CountingProxy(FaultProxy):
    """A `FaultProxy` that records when each connection arrives and resets the next
    `refuse_next` ones at once (a Redis that is down, then back)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.arrivals: list[float] = []
        self.refuse_next = 0
        self.refuse_all = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.arrivals.append(time.monotonic())
        refusing = self.refuse_next > 0
        if refusing:
            self.refuse_next -= 1
        # Decided per connection, before the parent looks at it (synchronously).
        self.refuse = refusing or self.refuse_all
        await super()._accept(reader, writer)

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]


@pytest.fixture
async def proxy(redis_server: RedisServer) -> Any:
    async with CountingProxy(redis_server.port) as counting:
        yield counting


def backend_for(
    url: str,
    *,
    op_timeout: float = 5.0,
    socket_timeout: float = 0.5,
    backoff: tuple[float, float] = (BACKOFF_BASE, BACKOFF_CAP),
) -> RedisBackend:
    options = RedisOptions(
        url=url, op_timeout=op_timeout, socket_timeout=socket_timeout, connect_timeout=0.5
    )
    base, cap = backoff
    client = make_client(options)
    return RedisBackend(client, op_timeout=op_timeout, backoff_base=base, backoff_cap=cap)


@contextlib.contextmanager
def only_client(server: RedisServer) -> Iterator[redis.Redis]:
    """Hold the server's last free client slot: every new connection is refused with
    `-ERR max number of clients reached` until the block ends (or `maxclients` is raised)."""
    with contextlib.closing(server.client()) as admin:
        admin.client_kill_filter(_type="normal", skipme=True)
        connected = int(admin.info("clients")["connected_clients"])
        admin.config_set("maxclients", connected)
        try:
            yield admin
        finally:
            admin.config_set("maxclients", 10000)


def rejected(admin: redis.Redis) -> int:
    return int(admin.info("stats")["rejected_connections"])


# -- the backoff itself ---------------------------------------------------------------------


def test_backoff_sleeps_grow_exponentially_with_jitter_up_to_the_cap() -> None:
    for failures in range(1, 7):
        ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2**failures)
        samples = [backoff_delay(failures) for _ in range(300)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples), (failures, samples[:5])
        assert len(set(samples)) > 250, "no jitter"
    # 0.125-0.25, 0.25-0.5, 0.5-1 s: each range starts where the one before ends, capped.
    assert [min(BACKOFF_CAP, BACKOFF_BASE * 2**n) for n in (1, 2, 3, 4)] == [0.25, 0.5, 1, 1]
    assert RETRIES == 3


# -- plain redis:// -------------------------------------------------------------------------

Operation = Callable[[RedisBackend], Awaitable[object]]
OPERATIONS: dict[str, Operation] = {
    "get_and_touch": lambda b: b.get_and_touch("k", 10),
    "peek": lambda b: b.peek("k"),
    "expire": lambda b: b.expire("k", 10),
    "create": lambda b: b.create("k", b"v", 10),
    "compare_and_set": lambda b: b.compare_and_set("k", "1", b"v", 10),
    "delete_if_revision": lambda b: b.delete_if_revision("k", "1"),
    "delete_unless_revision": lambda b: b.delete_unless_revision("k", "1"),
    "replace": lambda b: b.replace("k", b"v", 10),
    "delete": lambda b: b.delete("k"),
    "ping": lambda b: b.ping(),
    "rate_limit": lambda b: b.rate_limit([TokenBucket("rl", 5, 60)]),
    "start_check": lambda b: b.check_server(5.0),
}


@pytest.mark.parametrize("fault", ["refused", "black hole"])
@pytest.mark.parametrize("name", list(OPERATIONS))
async def test_every_operation_makes_exactly_four_attempts(
    proxy: CountingProxy, name: str, fault: str
) -> None:
    """Refused (reset at once) or black-holed (each attempt ends by its socket timeout):
    4 connections, not 1 (no retry) nor 16 (redis-py's nested loops)."""
    proxy.refuse_all = fault == "refused"
    proxy.black_hole = fault == "black hole"
    backend = backend_for(proxy.redis_url, socket_timeout=0.1, backoff=FAST_BACKOFF)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await OPERATIONS[name](backend)
    finally:
        await backend.close()
    assert len(proxy.arrivals) == 1 + RETRIES
    kind = "ConnectionError" if fault == "refused" else "TimeoutError"
    message = str(info.value)
    assert message.startswith(kind) and message.endswith("after 4 attempts"), message
    assert type(info.value.__cause__).__name__ == kind


async def test_the_sleeps_between_attempts_grow(proxy: CountingProxy) -> None:
    """The production backoff: the gaps between the 4 connection attempts are at least the
    shortest possible sleeps, 0.125, 0.25 and 0.5 s (a sleep can only be longer)."""
    proxy.refuse_all = True
    backend = backend_for(proxy.redis_url, op_timeout=5.0)
    try:
        with pytest.raises(StoreUnavailable, match=r"after 4 attempts$"):
            await backend.get_and_touch("k", 10)
    finally:
        await backend.close()
    gaps = proxy.gaps()
    assert len(gaps) == RETRIES
    assert all(gap >= least for gap, least in zip(gaps, MIN_SLEEPS, strict=True)), gaps
    assert MIN_SLEEPS == [0.125, 0.25, 0.5]


async def test_with_the_production_deadline_a_down_redis_fails_within_it(
    proxy: CountingProxy,
) -> None:
    """`REDIS_OP_TIMEOUT_SECONDS` (2 s) bounds everything: at most 4 attempts, and a retry
    whose sleep would end past the deadline is not started (the message says so)."""
    proxy.refuse_all = True
    backend = backend_for(proxy.redis_url, op_timeout=PRODUCTION_OP_TIMEOUT)
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable) as info:
            await backend.get_and_touch("k", 10)
    finally:
        await backend.close()
    elapsed = time.monotonic() - started
    assert elapsed < PRODUCTION_OP_TIMEOUT + 0.5, elapsed
    assert 2 <= len(proxy.arrivals) <= 4
    message = str(info.value)
    assert message.startswith("ConnectionError: ") and "deadline" not in message.split(" after")[0]
    assert f"after {len(proxy.arrivals)} attempts" in message


async def test_a_deadline_that_cuts_an_attempt_names_what_came_before(
    proxy: CountingProxy,
) -> None:
    """The first connection is refused, the second hangs: the deadline ends the operation,
    and the message says so and names the earlier real error."""
    proxy.refuse_next = 1
    proxy.black_hole = True
    backend = backend_for(proxy.redis_url, op_timeout=0.6, socket_timeout=5.0)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await backend.get_and_touch("k", 10)
    finally:
        await backend.close()
    message = str(info.value)
    assert message.startswith("TimeoutError: no answer within the 0.6 s deadline (2 attempts; ")
    assert "the one before failed with ConnectionError" in message
    assert len(proxy.arrivals) == 2


async def test_a_redis_back_within_the_budget_is_invisible_through_http(
    gateway_factory: GatewayFactory, proxy: CountingProxy
) -> None:
    """Every pooled connection drops (a restart) and the next 2 connections are refused:
    the read still answers 200 with the data, on the 3rd connection, and keeps the cookie."""
    gateway = await gateway_factory("redis", PRODUCTION_BUDGET, REDIS_URL=proxy.redis_url)
    resp = await gateway.client.patch(SESSION, json={"a": 1}, headers=CSRF)
    assert resp.status == 200
    sid = gateway.session_id()

    assert proxy.reset_all() >= 1
    before = len(proxy.arrivals)
    proxy.refuse_next = 2
    resp = await gateway.client.get(SESSION)
    assert (resp.status, await resp.json()) == (200, {"data": {"a": 1}})
    assert resp.headers.getall("Set-Cookie", []) == []
    assert len(proxy.arrivals) - before == 3
    resp = await gateway.client.patch(SESSION, json={"b": 2}, headers=CSRF)
    assert (resp.status, await resp.json()) == (200, {"data": {"a": 1, "b": 2}})
    assert gateway.session_id() == sid


async def test_the_503_log_names_the_real_error_and_the_attempts(
    gateway_factory: GatewayFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The review's reproduction, through HTTP with the production budget: a Redis at
    `maxclients` gets at most 4 connection attempts per request (was 7, and 16 without the
    deadline), and the log says why the store is unavailable."""
    gateway = await gateway_factory("redis", PRODUCTION_BUDGET, REDIS_URL=redis_server.url)
    resp = await gateway.client.patch(SESSION, json={"a": 1}, headers=CSRF)
    assert resp.status == 200
    with only_client(redis_server) as admin, caplog.at_level(logging.WARNING):
        before = rejected(admin)
        started = time.monotonic()
        resp = await gateway.client.get(SESSION)
        elapsed = time.monotonic() - started
        attempts = rejected(admin) - before
    assert resp.status == 503 and elapsed < FAST_FAIL_BOUND, elapsed
    assert (await resp.json())["error"]["code"] == "session_store_unavailable"
    logged = [r.getMessage() for r in caplog.records if "session store unavailable" in r.message]
    assert len(logged) == 1, logged
    found = re.search(
        # redis-py 8.2 names the subclass (MaxClientsReachedError), 8.1 ConnectionError.
        r"(?:ConnectionError|MaxClientsReachedError): max number of clients reached after (\d) "
        r"attempts",
        logged[0],
    )
    assert found is not None, logged[0]
    # The first attempt may go to a pooled connection that Redis just closed (no new
    # connection); every other attempt is one refused connection.
    assert 2 <= attempts <= int(found.group(1)) <= 1 + RETRIES, (attempts, logged[0])
    # Back to normal once Redis accepts connections again.
    resp = await gateway.client.get(SESSION)
    assert (resp.status, await resp.json()) == (200, {"data": {"a": 1}})


async def test_errors_another_try_cannot_cure_are_not_retried(
    redis_server: RedisServer, proxy: CountingProxy
) -> None:
    """A wrong password, and a key of the wrong type: one attempt each."""
    with contextlib.closing(redis_server.client()) as admin:
        admin.config_set("requirepass", "right")
    try:
        url = f"redis://:wrong@127.0.0.1:{proxy.port}/0"
        backend = backend_for(url, backoff=FAST_BACKOFF)
        try:
            with pytest.raises(StoreUnavailable, match=r"^AuthenticationError: [^()]*$"):
                await backend.get_and_touch("k", 10)
        finally:
            await backend.close()
        assert len(proxy.arrivals) == 1

        backend = backend_for(f"redis://:right@127.0.0.1:{proxy.port}/0", backoff=FAST_BACKOFF)
        try:
            await backend.client.rpush("list", "x")
            await backend.client.config_resetstat()
            assert await backend.get_and_touch("list", 10) is None  # removed, not retried
        finally:
            await backend.close()
        with contextlib.closing(
            redis.Redis(port=redis_server.port, password="right", protocol=2)
        ) as admin:
            stats: dict[str, Any] = admin.info("commandstats")
        assert int(stats["cmdstat_getex"]["calls"]) == 1, stats["cmdstat_getex"]
    finally:
        with contextlib.closing(
            redis.Redis(port=redis_server.port, password="right", protocol=2)
        ) as admin:
            admin.config_set("requirepass", "")


# -- redis+sentinel:// ----------------------------------------------------------------------


async def test_sentinel_one_failed_operation_is_four_attempts_at_the_primary() -> None:
    """Each attempt asks the Sentinel for the primary, then connects to it once."""
    with SentinelTopology(sentinels=1) as topology:
        backend = backend_for(topology.url, backoff=FAST_BACKOFF)
        try:
            with only_client(topology.primary) as admin:
                admin.set("k", b"v")
                before = rejected(admin)
                with pytest.raises(StoreUnavailable) as info:
                    await backend.get_and_touch("k", 60)
                assert rejected(admin) - before == 1 + RETRIES
            assert str(info.value) in (
                "ConnectionError: max number of clients reached after 4 attempts",
                "MaxClientsReachedError: max number of clients reached after 4 attempts",
            )
            assert await backend.get_and_touch("k", 60) == b"v"
        finally:
            await backend.close()


# -- redis+cluster:// -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterTopology]:
    with RedisClusterTopology(3) as topology:
        yield topology


@dataclass(frozen=True)
class Victim:
    """A primary that does not hold slot 0 (so it is never the client's default node), a key
    it serves, a key another primary serves, and a URL seeding only the other primaries (so
    no connection reaches the victim before the operation under test)."""

    node: RedisServer
    key: str
    other_key: str
    url: str


def victim_of(cluster: RedisClusterTopology, tag: str) -> Victim:
    with contextlib.closing(cluster.nodes[0].client()) as client:
        ranges: Any = command(client, "CLUSTER", "SLOTS")
    owner = {int(p[1]): (int(a), int(b)) for a, b, p, *_ in ranges}

    def port_of(key: str) -> int:
        slot = key_slot(key.encode())
        return next(port for port, (a, b) in owner.items() if a <= slot <= b)

    slot0 = next(port for port, (a, _) in owner.items() if a == 0)
    keys = [f"agent:sess:demo:{tag}-{i}" for i in range(200)]
    key = next(k for k in keys if port_of(k) != slot0)
    victim = next(n for n in cluster.nodes if n.port == port_of(key))
    other = next(k for k in keys if port_of(k) != victim.port)
    seeds = ",".join(f"127.0.0.1:{n.port}" for n in cluster.nodes if n is not victim)
    return Victim(victim, key, other, f"redis+cluster://{seeds}")


async def test_cluster_one_failed_operation_is_four_attempts_with_backoff(
    cluster: RedisClusterTopology,
) -> None:
    """The node serving the key refuses connections: exactly 4 attempts at it (the slot map
    is refreshed from the other nodes in between), with the production sleeps (the cluster
    client alone retried without any), and the other primaries' keys keep working."""
    victim = victim_of(cluster, "count")
    backend = backend_for(victim.url)
    try:
        with only_client(victim.node) as admin:
            before = rejected(admin)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                await backend.get_and_touch(victim.key, 60)
            elapsed = time.monotonic() - started
            assert rejected(admin) - before == 1 + RETRIES
            assert await backend.create(victim.other_key, b"v", 60)
        assert str(info.value) == (
            "ResponseError: max number of clients + cluster connections reached after 4 attempts"
        )
        assert elapsed >= sum(MIN_SLEEPS), elapsed
        assert await backend.create(victim.key, b"v", 60)
    finally:
        await backend.close()


async def test_cluster_a_node_back_within_the_budget_is_invisible(
    cluster: RedisClusterTopology,
) -> None:
    victim = victim_of(cluster, "back")
    backend = backend_for(victim.url)
    try:
        with only_client(victim.node) as admin:
            admin.set(victim.key, b"kept")
            before = rejected(admin)

            def accept_again_after_two_refusals() -> None:
                deadline = time.monotonic() + 10
                while rejected(admin) - before < 2 and time.monotonic() < deadline:
                    time.sleep(0.005)
                admin.config_set("maxclients", 10000)

            lifter = asyncio.create_task(asyncio.to_thread(accept_again_after_two_refusals))
            value = await backend.get_and_touch(victim.key, 60)
            await lifter
            assert rejected(admin) - before == 2
        assert value == b"kept"
    finally:
        await backend.close()


async def test_cluster_a_frozen_node_is_four_attempts_with_a_slot_map_refresh_between(
    cluster: RedisClusterTopology,
) -> None:
    """SIGSTOP: each attempt times out (a connection error for the cluster client, which
    then refreshes its slot map from the other nodes before the next). The kernel queues
    every connection attempt while the node is frozen; it accepts them all when thawed."""
    victim = victim_of(cluster, "frozen")
    backend = backend_for(victim.url, socket_timeout=0.1, backoff=FAST_BACKOFF)
    try:
        with contextlib.closing(victim.node.client()) as admin:
            before = int(admin.info("stats")["total_connections_received"])
            victim.node.pause()
            try:
                with pytest.raises(StoreUnavailable) as info:
                    await backend.get_and_touch(victim.key, 60)
            finally:
                victim.node.resume()
            received = 0
            async with asyncio.timeout(5):
                while received == 0:  # the queue is accepted in one go
                    received = int(admin.info("stats")["total_connections_received"]) - before
        assert received == 1 + RETRIES
        message = str(info.value)
        assert message.startswith("TimeoutError: Timeout") and message.endswith(
            "after 4 attempts"
        ), message
        assert await backend.create(victim.key, b"v", 60)
    finally:
        await backend.close()
