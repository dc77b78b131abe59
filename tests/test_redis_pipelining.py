"""Automatic pipelining (`app.sessions.pipelining.CommandPipeliner`) on a real redis-server.

The commands of concurrent requests share pipelined round trips, with the semantics of sending
each alone: every caller gets its own reply or its own error, a failed connection fails only the
commands it carried (each then retries on its own budget), a caller that gives up does not put
the connection out of step, and the pool's limits hold.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.sessions.pipelining import CommandPipeliner, pack_command
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import RedisOptions, make_client
from tests.conftest import CSRF, GatewayFactory
from tests.fault_proxy import FaultProxy
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis_server

SESSION = "/apps/demo/session"


@contextlib.asynccontextmanager
async def pipeliner_on(
    url: str, *, max_batch: int = 256, **options: Any
) -> AsyncIterator[tuple[CommandPipeliner, aioredis.Redis]]:
    client = make_client(RedisOptions(url=url, **options))
    assert isinstance(client, aioredis.Redis)
    pipeliner = CommandPipeliner(client.connection_pool, max_batch=max_batch)
    try:
        yield pipeliner, client
    finally:
        await pipeliner.close()
        await client.aclose()


@contextlib.asynccontextmanager
async def behind_proxy(server: RedisServer) -> AsyncIterator[tuple[FaultProxy, CommandPipeliner]]:
    """A pipeliner whose connections go through a `FaultProxy` (long socket timeout)."""
    async with (
        FaultProxy(server.port) as proxy,
        pipeliner_on(proxy.redis_url, socket_timeout=5.0) as (pipeliner, _),
    ):
        yield proxy, pipeliner


def data_commands(server: RedisServer) -> dict[str, int]:
    """Calls per command since the last reset, without connection setup (CLIENT SETNAME,
    PING health checks) and the test's own CONFIG RESETSTAT."""
    calls = server.command_calls()
    overhead = {"client|setname", "client|setinfo", "ping", "config|resetstat", "select", "info"}
    return {name: n for name, n in calls.items() if name not in overhead}


def reset_stats(server: RedisServer) -> None:
    with contextlib.closing(server.client()) as client:
        client.config_resetstat()


def connections_of(client: aioredis.Redis) -> int:
    pool = client.connection_pool
    return len(pool._available_connections) + len(pool._in_use_connections)


async def test_commands_of_one_loop_iteration_are_one_batch_on_one_connection(
    shared_redis: RedisServer,
) -> None:
    async with pipeliner_on(shared_redis.url) as (pipeliner, client):
        futures = [pipeliner.execute("SET", f"k{i}", f"v{i}") for i in range(50)]
        assert await asyncio.gather(*futures) == [b"OK"] * 50
        replies = await asyncio.gather(*(pipeliner.execute("GET", f"k{i}") for i in range(50)))
        assert replies == [f"v{i}".encode() for i in range(50)], "replies reach their own callers"
        assert (pipeliner.batches, pipeliner.commands) == (2, 100)
        assert connections_of(client) == 1
    assert data_commands(shared_redis) == {"set": 50, "get": 50}


async def test_a_busy_iteration_is_split_into_batches_of_max_batch(
    shared_redis: RedisServer,
) -> None:
    async with pipeliner_on(shared_redis.url, max_batch=4) as (pipeliner, _):
        replies = await asyncio.gather(*(pipeliner.execute("INCR", "n") for _ in range(10)))
        assert sorted(replies) == list(range(1, 11))
        assert (pipeliner.batches, pipeliner.commands) == (3, 10)


async def test_a_command_error_belongs_to_its_command_only(shared_redis: RedisServer) -> None:
    async with pipeliner_on(shared_redis.url) as (pipeliner, _):
        await pipeliner.execute("RPUSH", "a-list", "x")
        await pipeliner.execute("SET", "a-string", "value")
        results = await asyncio.gather(
            pipeliner.execute("GETEX", "a-string", "EX", 60),
            pipeliner.execute("GETEX", "a-list", "EX", 60),
            pipeliner.execute("EVALSHA", "0" * 40, 0),
            pipeliner.execute("GET", "a-string"),
            return_exceptions=True,
        )
        assert results[0] == b"value"
        assert isinstance(results[1], ResponseError) and "WRONGTYPE" in str(results[1])
        assert isinstance(results[2], NoScriptError), results[2]
        assert results[3] == b"value"
        assert pipeliner.batches == 3


async def test_a_caller_that_gives_up_leaves_the_connection_in_step(
    shared_redis: RedisServer,
) -> None:
    async with pipeliner_on(shared_redis.url) as (pipeliner, client):
        first = pipeliner.execute("ECHO", "one")
        given_up = pipeliner.execute("ECHO", "two")
        third = pipeliner.execute("ECHO", "three")
        given_up.cancel()
        assert await first == b"one"
        assert await third == b"three"
        # The same (only) connection answers the next batch with its own replies.
        assert await asyncio.gather(*(pipeliner.execute("ECHO", str(i)) for i in range(5))) == [
            str(i).encode() for i in range(5)
        ]
        assert connections_of(client) == 1


async def test_a_reset_connection_fails_its_batch_and_is_not_reused(
    redis_server: RedisServer,
) -> None:
    async with behind_proxy(redis_server) as (proxy, pipeliner):
        assert await pipeliner.execute("PING") == b"PONG"
        proxy.latency = 0.3
        batch = [pipeliner.execute("ECHO", str(i)) for i in range(5)]
        await asyncio.sleep(0.1)  # written, replies held by the latency
        assert proxy.reset_all() >= 1
        results = await asyncio.gather(*batch, return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in results), results
        proxy.heal()
        assert await pipeliner.execute("ECHO", "after") == b"after"


async def test_a_frozen_server_fails_the_batch_within_the_socket_timeout(
    redis_server: RedisServer,
) -> None:
    async with pipeliner_on(redis_server.url, socket_timeout=0.3) as (pipeliner, _):
        assert await pipeliner.execute("PING") == b"PONG"
        redis_server.pause()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            results = await asyncio.gather(
                *(pipeliner.execute("GET", "k") for _ in range(3)), return_exceptions=True
            )
            elapsed = loop.time() - started
        finally:
            redis_server.resume()
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        assert 0.25 <= elapsed < 1.5, elapsed
        assert await pipeliner.execute("ECHO", "back") == b"back"


async def test_an_exhausted_pool_fails_the_batch_with_the_pool_error(
    redis_server: RedisServer,
) -> None:
    async with pipeliner_on(redis_server.url, max_connections=1, pool_timeout=0.2) as (
        pipeliner,
        client,
    ):
        held = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            results = await asyncio.gather(
                pipeliner.execute("PING"), pipeliner.execute("PING"), return_exceptions=True
            )
        finally:
            await client.connection_pool.release(held)
        assert [str(r) for r in results] == ["No connection available."] * 2
        assert await pipeliner.execute("PING") == b"PONG"


async def test_close_fails_queued_commands_and_ends_batches_in_flight(
    redis_server: RedisServer,
) -> None:
    async with behind_proxy(redis_server) as (proxy, pipeliner):
        assert await pipeliner.execute("PING") == b"PONG"
        proxy.latency = 2.0
        in_flight = pipeliner.execute("ECHO", "slow")
        await asyncio.sleep(0.1)
        queued = pipeliner.execute("ECHO", "queued")
        await asyncio.wait_for(pipeliner.close(), 1.0)
        for future in (in_flight, queued):
            with pytest.raises(RedisConnectionError):
                await future
        with pytest.raises(RedisConnectionError):
            await pipeliner.execute("PING")


async def test_concurrent_http_requests_share_round_trips(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = await gateway_factory("redis")
    assert gateway.redis_server is not None
    resp = await gateway.client.patch(SESSION, json={"a": 1}, headers=CSRF)
    assert resp.status == 200
    backend = gateway.backend
    assert isinstance(backend, RedisBackend) and backend.pipeliner is not None
    batches_before = backend.pipeliner.batches
    reset_stats(gateway.redis_server)

    responses = await asyncio.gather(*(gateway.client.get(SESSION) for _ in range(40)))
    assert [(r.status, await r.json()) for r in responses] == [(200, {"data": {"a": 1}})] * 40
    assert data_commands(gateway.redis_server) == {"getex": 40}, "each request slid its TTL"
    batches = backend.pipeliner.batches - batches_before
    assert batches < 40, f"{batches} round trips for 40 concurrent reads: nothing was shared"


async def test_without_pipelining_every_command_is_its_own_round_trip(
    shared_redis: RedisServer,
) -> None:
    backend = RedisBackend(make_client(RedisOptions(url=shared_redis.url)), pipelining=False)
    try:
        assert backend.pipeliner is None
        assert await backend.create("k", b"v", 60)
        assert (
            await asyncio.gather(*(backend.get_and_touch("k", 60) for _ in range(5))) == [b"v"] * 5
        )
    finally:
        await backend.close()
    assert data_commands(shared_redis) == {"set": 1, "getex": 5}


@pytest.mark.parametrize(
    "args",
    [
        ("GETEX", "bff:demo:abc", "EX", 1800),
        ("SET", "k", b"\x00\xff{}\r\n", "EX", 60, "NX"),
        ("EVALSHA", "a" * 40, 1, "k", "ünïcode", 12.5, -3, b""),
        ("SET", "k", bytearray(b"ba"), memoryview(b"mv")),
    ],
)
def test_commands_are_packed_as_redis_py_packs_them(args: tuple[Any, ...]) -> None:
    reference = Connection()
    assert pack_command(args) == b"".join(reference.pack_command(*args))


@pytest.mark.parametrize("bad", [True, None, object()])
def test_arguments_redis_cannot_take_are_refused(bad: object) -> None:
    with pytest.raises(TypeError):
        pack_command(("SET", "k", bad))


async def test_a_bad_argument_fails_its_own_caller_not_the_batch(shared_redis: RedisServer) -> None:
    async with pipeliner_on(shared_redis.url) as (pipeliner, _):
        before = pipeliner.execute("ECHO", "before")
        with pytest.raises(TypeError):
            pipeliner.execute("SET", "k", None)
        after = pipeliner.execute("ECHO", "after")
        assert (await before, await after) == (b"before", b"after")
        assert (pipeliner.batches, pipeliner.commands) == (1, 2)
