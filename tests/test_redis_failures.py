"""Catalogue rows R* (docs/reliability.md): the session store misbehaves under a
running gateway, a real `redis-server` each time (plus `tests/fault_proxy.py` in front of it
for latency, held writes and dropped connections).

Every test checks the row's outcome *and* that nothing was lost: the prior session value is
intact in Redis, the browser's cookie is kept (unless the row ends the session), no pooled
connection stays checked out, no request stays in flight, and the next good request succeeds.
Rows already proven elsewhere are listed in `tests/test_reliability_catalogue.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientResponse, web
from pytest_aiohttp import AiohttpServer

from app.keys import BACKEND_KEY, LIFECYCLE_KEY
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import RedisOptions, make_client
from tests.conftest import CSRF, Gateway, GatewayFactory, GatewayProcessFactory
from tests.fake_upstream import app_settings, run_gateway, serve_upstream, sse, start_sse
from tests.fault_proxy import FaultProxy
from tests.gateway_process import REPO_ROOT
from tests.redis_server import RedisServer
from tests.test_redis_outage import PRODUCTION_BUDGET, assert_unavailable, timed

pytestmark = pytest.mark.redis_server

SESSION = "/apps/demo/session"


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    """A private server whose acknowledged writes survive SIGKILL (AOF, fsync every write)."""
    with RedisServer(appendonly=True, extra_args=["--appendfsync", "always"]) as server:
        yield server


def pool_of(gateway: Gateway) -> aioredis.BlockingConnectionPool:
    backend = gateway.backend
    assert isinstance(backend, RedisBackend)
    pool = backend.client.connection_pool  # type: ignore[union-attr]
    assert isinstance(pool, aioredis.BlockingConnectionPool)
    return pool


def in_use(pool: aioredis.ConnectionPool) -> int:
    return len(pool._in_use_connections)


async def settle(gateway: Gateway, timeout: float = 5.0) -> None:
    """Nothing left behind: no request in flight, no Redis connection checked out."""
    lifecycle = gateway.app[LIFECYCLE_KEY]
    pool = pool_of(gateway)
    async with asyncio.timeout(timeout):
        while lifecycle.in_flight or in_use(pool):
            await asyncio.sleep(0.02)


async def start_session(gateway: Gateway, data: dict[str, Any]) -> str:
    resp = await gateway.client.patch(SESSION, json=data, headers=CSRF)
    assert resp.status == 200, await resp.text()
    sid = gateway.session_id()
    assert sid is not None
    return sid


async def stored_data(server: RedisServer, gateway: Gateway, sid: str) -> Any:
    """The browser-visible `data` of the stored session, read straight from Redis."""
    with contextlib.closing(server.client()) as client:
        raw = client.get(gateway.key(sid))
    return None if raw is None else json.loads(raw)["data"]


async def get_data(gateway: Gateway) -> tuple[int, Any]:
    resp = await gateway.client.get(SESSION)
    body = await resp.json()
    return resp.status, body.get("data", body)


def no_set_cookie(resp: ClientResponse) -> bool:
    return resp.headers.getall("Set-Cookie", []) == []


def commandstats(server: RedisServer, command: str) -> dict[str, int]:
    """`calls`, `rejected_calls`, `failed_calls` of one command since the last reset."""
    with contextlib.closing(server.client()) as client:
        info: dict[str, Any] = client.info("commandstats")
    stats = info.get(f"cmdstat_{command}", {})
    return {k: int(stats.get(k, 0)) for k in ("calls", "rejected_calls", "failed_calls")}


def is_session_write(chunk: bytes) -> bool:
    """A RESP chunk carrying a session write (`SET` or a compare-and-set script)."""
    return b"$3\r\nSET\r\n" in chunk or b"EVAL" in chunk


# -- R3: a restart shorter than the retry budget ---------------------------------------------


async def test_R03_a_short_restart_with_aof_is_invisible_and_loses_nothing(
    gateway_factory: GatewayFactory, aof_redis: RedisServer
) -> None:
    """SIGKILL, 0.4 s without Redis, restart (AOF reloads): requests that span the gap wait in
    redis-py's retry budget and succeed; every acknowledged write is still there."""
    gateway = await gateway_factory("redis", PRODUCTION_BUDGET, REDIS_URL=aof_redis.url)
    sid = await start_session(gateway, {"a": 1})
    statuses: list[int] = []
    slowest = 0.0
    acked = 0
    stop = asyncio.Event()

    async def reader() -> None:
        nonlocal slowest
        while not stop.is_set():
            started = time.monotonic()
            status, data = await get_data(gateway)
            slowest = max(slowest, time.monotonic() - started)
            statuses.append(status)
            if status == 200:
                assert data["a"] == 1 and data.get("n", 0) <= acked + 1

    async def writer() -> None:
        nonlocal acked
        n = 0
        while not stop.is_set():
            n += 1
            resp = await gateway.client.patch(SESSION, json={"n": n}, headers=CSRF)
            statuses.append(resp.status)
            if resp.status == 200:
                acked = n

    tasks = [asyncio.create_task(reader()) for _ in range(3)] + [asyncio.create_task(writer())]
    await asyncio.sleep(0.2)
    await asyncio.to_thread(aof_redis.kill)
    await asyncio.sleep(0.4)
    await asyncio.to_thread(aof_redis.restart)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*tasks)

    assert set(statuses) == {200}, f"{statuses.count(503)} of {len(statuses)} failed"
    assert slowest >= 0.3, "no request spanned the outage: the test proved nothing"
    assert await stored_data(aof_redis, gateway, sid) == {"a": 1, "n": acked}
    assert gateway.session_id() == sid
    await settle(gateway)


async def test_R03_without_aof_a_restart_loses_sessions_which_read_as_none_not_errors(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    """The honest other half of R3 (durability promise f): without AOF the data is gone after a
    Redis restart. The browser sees "no session" (200, `{}`), its cookie is not touched, and
    its next write starts a new session with a new id; nothing errors."""
    gateway = await gateway_factory("redis", PRODUCTION_BUDGET, REDIS_URL=redis_server.url)
    sid = await start_session(gateway, {"a": 1})
    await asyncio.to_thread(redis_server.restart, kill_first=True)

    resp = await gateway.client.get(SESSION)
    assert (resp.status, await resp.json()) == (200, {"data": {}})
    assert no_set_cookie(resp)
    resp = await gateway.client.patch(SESSION, json={"b": 2}, headers=CSRF)
    assert (resp.status, await resp.json()) == (200, {"data": {"b": 2}})
    new_sid = gateway.session_id()
    assert new_sid is not None and new_sid != sid
    await settle(gateway)


# -- R5: stale pooled connections ------------------------------------------------------------


async def wave(gateway: Gateway, n: int) -> list[tuple[int, Any]]:
    return await asyncio.gather(*(get_data(gateway) for _ in range(n)))


async def fill_pool(gateway: Gateway, n: int) -> None:
    """Leave `n` connected connections idle in the pool (pipelining lets a wave of requests
    share one or two, so a wave alone no longer fills it)."""
    pool = pool_of(gateway)
    connections = [await pool.get_connection() for _ in range(n)]  # type: ignore[no-untyped-call]
    for connection in connections:
        await pool.release(connection)


async def test_R05_a_pool_full_of_stale_connections_after_a_restart_gives_no_5xx(
    gateway_factory: GatewayFactory, aof_redis: RedisServer
) -> None:
    gateway = await gateway_factory("redis", PRODUCTION_BUDGET, REDIS_URL=aof_redis.url)
    await start_session(gateway, {"a": 1})
    assert await wave(gateway, 30) == [(200, {"a": 1})] * 30
    await fill_pool(gateway, 8)
    pool = pool_of(gateway)
    stale = len(pool._available_connections)
    assert stale >= 5, f"only {stale} pooled connections: the test would prove little"

    await asyncio.to_thread(aof_redis.restart, kill_first=True)

    assert await wave(gateway, 30) == [(200, {"a": 1})] * 30
    await settle(gateway)


async def test_R05_client_kill_of_every_gateway_connection_is_invisible(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    gateway = await gateway_factory("redis", PRODUCTION_BUDGET, REDIS_URL=redis_server.url)
    sid = await start_session(gateway, {"a": 1})
    assert await wave(gateway, 20) == [(200, {"a": 1})] * 20
    await fill_pool(gateway, 4)
    with contextlib.closing(redis_server.client()) as admin:
        killed = admin.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 2

    assert await wave(gateway, 20) == [(200, {"a": 1})] * 20
    resp = await gateway.client.patch(SESSION, json={"b": 2}, headers=CSRF)
    assert resp.status == 200
    assert await stored_data(redis_server, gateway, sid) == {"a": 1, "b": 2}
    await settle(gateway)


# -- R6: black-holed Redis (CLIENT PAUSE; SIGSTOP is in test_redis_outage.py) ---------------


async def test_R06_client_pause_all_is_a_503_within_the_deadline_and_nothing_leaks(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    gateway = await gateway_factory("redis", PRODUCTION_BUDGET, REDIS_URL=redis_server.url)
    sid = await start_session(gateway, {"a": 1})
    with contextlib.closing(redis_server.client()) as admin:
        admin.client_pause(8000, all=True)
        try:
            resp, elapsed = await timed(gateway.client.get(SESSION))
            await assert_unavailable(resp, elapsed)
            resp, elapsed = await timed(gateway.client.patch(SESSION, json={"a": 2}, headers=CSRF))
            await assert_unavailable(resp, elapsed)
            started = time.monotonic()
            results = await wave(gateway, 15)
            assert [status for status, _ in results] == [503] * 15
            assert time.monotonic() - started < 4.5
            await settle(gateway)  # the abandoned commands gave their connections back
        finally:
            admin.client_unpause()
    assert gateway.session_id() == sid
    # The paused commands' late replies are never read as answers to new commands.
    for _ in range(5):
        assert await get_data(gateway) == (200, {"a": 1})
    assert await stored_data(redis_server, gateway, sid) == {"a": 1}
    await settle(gateway)


# -- R7: LOADING after a restart ------------------------------------------------------------


def _command_end(buf: bytes) -> int | None:
    """Where the first complete RESP command in `buf` ends, or None if it is incomplete."""
    line_end = buf.find(b"\r\n")
    if line_end < 0:
        return None
    if not buf.startswith(b"*"):  # an inline command
        return line_end + 2
    pos = line_end + 2
    for _ in range(int(buf[1:line_end])):
        header_end = buf.find(b"\r\n", pos)
        if header_end < 0:
            return None
        pos = header_end + 2 + int(buf[pos + 1 : header_end]) + 2
        if pos > len(buf):
            return None
    return pos


class LoadingRedis:
    """Redis as it answers while loading its dataset after a restart: in front of a real
    server, `start_loading()` drops every connection (the restart) and then answers each
    command with `-LOADING` until `stop_loading()`, after which connections are forwarded."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.loading = asyncio.Event()
        self.done = asyncio.Event()
        self.loading_replies = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def start_loading(self) -> None:
        self.done.clear()
        self.loading.set()
        for writer in list(self._writers):
            writer.transport.abort()

    def stop_loading(self) -> None:
        self.loading.clear()
        self.done.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        buf = b""
        try:
            while self.loading.is_set():
                read = asyncio.ensure_future(reader.read(65536))
                done = asyncio.ensure_future(self.done.wait())
                await asyncio.wait((read, done), return_when=asyncio.FIRST_COMPLETED)
                done.cancel()
                if not read.done():
                    read.cancel()
                    break
                chunk = read.result()
                if not chunk:
                    return
                buf += chunk
                while (end := _command_end(buf)) is not None:
                    buf = buf[end:]
                    writer.write(b"-LOADING Redis is loading the dataset in memory\r\n")
                    self.loading_replies += 1
                await writer.drain()
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.add(up_writer)
            up_writer.write(buf)

            async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while chunk := await src.read(65536):
                        dst.write(chunk)
                        await dst.drain()
                dst.close()

            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)


@pytest.fixture
async def loading_redis(redis_server: RedisServer) -> AsyncIterator[LoadingRedis]:
    stub = LoadingRedis(redis_server.port)
    await stub.start()
    yield stub
    await stub.close()


async def test_R07_loading_is_retried_within_the_budget_then_503_and_recovers(
    gateway_factory: GatewayFactory, redis_server: RedisServer, loading_redis: LoadingRedis
) -> None:
    gateway = await gateway_factory("redis", PRODUCTION_BUDGET, REDIS_URL=loading_redis.url)
    sid = await start_session(gateway, {"a": 1})

    # A short load (0.3 s) is waited out: `BusyLoadingError` is retried.
    loading_redis.start_loading()
    asyncio.get_running_loop().call_later(0.3, loading_redis.stop_loading)
    assert await get_data(gateway) == (200, {"a": 1})
    assert loading_redis.loading_replies > 0

    # A long one answers 503 within the deadline; the cookie is kept.
    loading_redis.start_loading()
    resp, elapsed = await timed(gateway.client.get(SESSION))
    await assert_unavailable(resp, elapsed)
    loading_redis.stop_loading()
    assert await get_data(gateway) == (200, {"a": 1})
    assert gateway.session_id() == sid
    await settle(gateway)


# -- R8: OOM (maxmemory + noeviction) -------------------------------------------------------


async def test_R08_a_full_redis_refuses_writes_with_503_and_keeps_serving_reads(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    gateway = await gateway_factory("redis", PRODUCTION_BUDGET, REDIS_URL=redis_server.url)
    sid = await start_session(gateway, {"a": 1})
    with contextlib.closing(redis_server.client()) as admin:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")  # below what is used: every denyoom command fails
        admin.config_resetstat()
        try:
            resp, elapsed = await timed(gateway.client.patch(SESSION, json={"a": 2}, headers=CSRF))
            assert resp.status == 503 and elapsed < 1.0, "OOM is final: never retried"
            body = await resp.json()
            assert body["error"]["code"] == "session_store_full"
            assert resp.headers["Retry-After"] and resp.headers["Cache-Control"] == "no-store"
            assert no_set_cookie(resp)
            # One attempt: a compare-and-set script (whose inner SET is refused) or a SET.
            script, plain = commandstats(redis_server, "evalsha"), commandstats(redis_server, "set")
            attempts = script["calls"] + script["rejected_calls"]
            attempts = attempts or plain["calls"] + plain["rejected_calls"]
            assert attempts == 1, f"the refused write was retried: {script} {plain}"

            # Reads (GETEX does not allocate) are still served, the old value intact.
            assert await get_data(gateway) == (200, {"a": 1})
            assert await stored_data(redis_server, gateway, sid) == {"a": 1}
            # A new browser cannot get a session, and nothing half-made is left behind.
            gateway.client.session.cookie_jar.clear()
            resp = await gateway.client.patch(SESSION, json={"x": 1}, headers=CSRF)
            assert resp.status == 503 and no_set_cookie(resp)
            assert len(admin.keys("*")) == 1
        finally:
            admin.config_set("maxmemory", "0")
    gateway.client.session.cookie_jar.update_cookies(
        {"agent_sid": sid}, gateway.client.make_url(SESSION)
    )
    resp = await gateway.client.patch(SESSION, json={"a": 2}, headers=CSRF)
    assert (resp.status, await resp.json()) == (200, {"data": {"a": 2}})
    await settle(gateway)


# -- R10: pool exhaustion -------------------------------------------------------------------


async def test_R10_an_exhausted_pool_answers_503_fast_without_a_deadlock(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    async with FaultProxy(redis_server.port) as proxy:
        gateway = await gateway_factory(
            "redis",
            REDIS_URL=proxy.redis_url,
            REDIS_MAX_CONNECTIONS="2",
            REDIS_POOL_TIMEOUT_SECONDS="0.5",
            REDIS_SOCKET_TIMEOUT_SECONDS="2",
            REDIS_OP_TIMEOUT_SECONDS="3",
        )
        sid = await start_session(gateway, {"a": 1})
        proxy.latency = 0.3  # a slow Redis: each command holds its connection ~0.3 s

        async def get_after(delay: float) -> Any:
            await asyncio.sleep(delay)
            return await gateway.client.get(SESSION)

        # Requests 25 ms apart: each is its own pipelined batch (requests of one loop
        # iteration would share one connection), so 20 batches want 2 connections.
        started = time.monotonic()
        responses = await asyncio.gather(*(get_after(0.025 * i) for i in range(20)))
        elapsed = time.monotonic() - started
        statuses = [r.status for r in responses]
        assert set(statuses) <= {200, 503}
        assert statuses.count(503) >= 8, statuses
        assert elapsed < 3.0, f"20 requests on 2 connections took {elapsed:.2f}s"
        for resp in responses:
            body = await resp.json()
            if resp.status == 503:
                assert body["error"]["code"] == "session_store_unavailable"
                assert resp.headers["Retry-After"]
            else:
                assert body == {"data": {"a": 1}}
        pool = pool_of(gateway)
        await settle(gateway)
        assert len(pool._available_connections) <= 2

        proxy.heal()
        assert await get_data(gateway) == (200, {"a": 1})
        assert await stored_data(redis_server, gateway, sid) == {"a": 1}
        await settle(gateway)


# -- R11: cancellation in the middle of a command -------------------------------------------


async def test_R11_cancelled_commands_never_mix_replies_and_return_their_connections(
    redis_server: RedisServer,
) -> None:
    """Tasks cancelled at random points of their GETEX (sent, half-answered, queued for a
    connection): every completed one got its own key's value, and the pool has nothing
    checked out afterwards (CVE-2023-28858/28859, redis-py #4121)."""
    with contextlib.closing(redis_server.client()) as admin:
        for i in range(20):
            admin.set(f"k{i}", f"value-{i}")
    async with FaultProxy(redis_server.port) as proxy:
        proxy.latency = 0.01
        options = RedisOptions(
            url=proxy.redis_url,
            op_timeout=5,
            socket_timeout=2,
            connect_timeout=1,
            max_connections=8,
            pool_timeout=3,
        )
        backend = RedisBackend(make_client(options), op_timeout=5)
        try:
            rng = random.Random(28858)
            completed = cancelled = 0
            for _ in range(8):
                tasks = [
                    asyncio.create_task(backend.get_and_touch(f"k{i % 20}", 600)) for i in range(60)
                ]
                await asyncio.sleep(rng.uniform(0.0, 0.06))
                for task in tasks:
                    if rng.random() < 0.5:
                        task.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                for i, result in enumerate(results):
                    if isinstance(result, asyncio.CancelledError):
                        cancelled += 1
                    else:
                        assert result == f"value-{i % 20}".encode(), (i, result)
                        completed += 1
                pool = backend.client.connection_pool  # type: ignore[union-attr]
                assert in_use(pool) == 0
            assert completed > 50 and cancelled > 50
            proxy.latency = 0
            for i in range(60):  # every connection left in the pool is in step
                assert await backend.get_and_touch(f"k{i % 20}", 600) == f"value-{i % 20}".encode()
        finally:
            await backend.close()


async def test_R11_browsers_hanging_up_mid_command_leave_nothing_behind(
    aiohttp_server: AiohttpServer, redis_server: RedisServer
) -> None:
    """The production path: `python -m app` does not cancel handlers on disconnect, but the
    agent proxy cancels its own work when the browser hangs up, which lands in the middle of
    the session's GETEX when Redis is slow. Other browsers' requests, interleaved, always get
    their own session (their own conversation id upstream), and afterwards no request is in
    flight and no Redis connection is checked out."""
    upstream = await serve_upstream(aiohttp_server)

    async def answer(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse("done", {"thread": request.headers["X-Agent-Thread-Id"]}))
        return response

    for index in range(4):
        upstream.fake.on(f"/v1/chat/{index}", answer)
    async with FaultProxy(redis_server.port) as proxy:
        settings = app_settings(
            upstream.base,
            {
                "SESSION_STORE": "redis",
                "REDIS_URL": proxy.redis_url,
                "REDIS_SOCKET_TIMEOUT_SECONDS": "2",
                "REDIS_OP_TIMEOUT_SECONDS": "5",
                "REDIS_POOL_TIMEOUT_SECONDS": "5",
            },
        )
        async with run_gateway(settings) as gw:
            # Four browsers, each with its own session and conversation.
            cookies: list[str] = []
            threads: list[str] = []
            for index in range(4):
                gw.client.cookie_jar.clear()
                async with gw.client.post(f"/apps/shop/agent/chat/{index}", headers=CSRF) as r:
                    assert r.status == 200
                    threads.append(json.loads((await r.text()).split("data: ")[1])["thread"])
                (morsel,) = list(gw.client.cookie_jar)
                cookies.append(morsel.value)
            gw.client.cookie_jar.clear()
            proxy.latency = 0.15

            async def hang_up(index: int, after: float) -> None:
                _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(
                    f"POST /apps/shop/agent/chat/{index} HTTP/1.1\r\nHost: x\r\nX-CSRF: 1\r\n"
                    f"Cookie: agent_sid={cookies[index]}\r\nContent-Length: 0\r\n\r\n".encode()
                )
                await asyncio.sleep(after)
                writer.transport.abort()

            async def converse(index: int) -> None:
                async with gw.client.post(
                    f"/apps/shop/agent/chat/{index}",
                    headers={**CSRF, "Cookie": f"agent_sid={cookies[index]}"},
                ) as r:
                    assert r.status == 200
                    thread = json.loads((await r.text()).split("data: ")[1])["thread"]
                    assert thread == threads[index], "another session's reply was used"

            rng = random.Random(28859)
            jobs = [hang_up(rng.randrange(4), rng.uniform(0.0, 0.6)) for _ in range(24)]
            jobs += [converse(i % 4) for i in range(12)]
            rng.shuffle(jobs)
            await asyncio.gather(*jobs)

            lifecycle = gw.app[LIFECYCLE_KEY]
            backend = gw.app[BACKEND_KEY]
            assert isinstance(backend, RedisBackend)
            pool = backend.client.connection_pool  # type: ignore[union-attr]
            async with asyncio.timeout(5):
                while lifecycle.in_flight or in_use(pool):
                    await asyncio.sleep(0.05)
            leftovers = [
                t
                for t in asyncio.all_tasks()
                if getattr(t.get_coro(), "__qualname__", "").startswith(("_proxy", "_watch"))
            ]
            assert leftovers == []
            proxy.latency = 0
            for index in range(4):
                await converse(index)


# -- R15 / R16: a write that arrives after the session ended --------------------------------


async def test_R15_logout_on_one_replica_while_another_saves_later_is_not_undone(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    """Replica B loaded the session; its write is held in the network while replica A logs
    the session out; when B's write lands it must not bring the session back: B answers 409
    `session_ended` and expires the cookie."""
    a = await gateway_factory("redis", REDIS_URL=redis_server.url)
    async with FaultProxy(redis_server.port) as proxy:
        b = await gateway_factory(
            "redis",
            REDIS_URL=proxy.redis_url,
            REDIS_SOCKET_TIMEOUT_SECONDS="5",
            REDIS_OP_TIMEOUT_SECONDS="10",
        )
        sid = await start_session(a, {"a": 1})
        cookie = {"Cookie": f"agent_sid={sid}"}
        proxy.hold_if = is_session_write
        late = asyncio.create_task(b.client.patch(SESSION, json={"b": 2}, headers=CSRF | cookie))
        await asyncio.wait_for(proxy.held.wait(), 5)  # B has read the session; its write waits

        resp = await a.client.delete(SESSION, headers=CSRF)
        assert resp.status == 204
        proxy.release()
        resp = await late
        assert resp.status == 409
        assert (await resp.json())["error"]["code"] == "session_ended"
        (expired,) = resp.headers.getall("Set-Cookie")
        assert expired.startswith("agent_sid=") and "/apps/demo" in expired
        with contextlib.closing(redis_server.client()) as admin:
            assert admin.keys("*") == [], "the logged-out session came back"
        await settle(a)
        await settle(b)


async def test_R16_a_session_that_expires_between_load_and_save_is_not_recreated(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    async with FaultProxy(redis_server.port) as proxy:
        gateway = await gateway_factory(
            "redis",
            REDIS_URL=proxy.redis_url,
            SESSION_TTL_SECONDS="1",
            REDIS_SOCKET_TIMEOUT_SECONDS="5",
            REDIS_OP_TIMEOUT_SECONDS="10",
        )
        sid = await start_session(gateway, {"a": 1})
        proxy.hold_if = is_session_write
        late = asyncio.create_task(gateway.client.patch(SESSION, json={"b": 2}, headers=CSRF))
        await asyncio.wait_for(proxy.held.wait(), 5)
        with contextlib.closing(redis_server.client()) as admin:
            key = gateway.key(sid)
            async with asyncio.timeout(5):
                while admin.exists(key):
                    await asyncio.sleep(0.05)
            proxy.release()
            resp = await late
            assert resp.status == 409
            assert (await resp.json())["error"]["code"] == "session_ended"
            assert admin.keys("*") == [], "the expired session came back"
        assert gateway.session_id() is None, "the cookie of the ended session was not expired"
        # The browser's next write simply starts a new session.
        resp = await gateway.client.patch(SESSION, json={"c": 3}, headers=CSRF)
        assert (resp.status, await resp.json()) == (200, {"data": {"c": 3}})
        assert gateway.session_id() not in (None, sid)
        await settle(gateway)


# -- R20: logout, then the old cookie replayed ----------------------------------------------


async def test_R20_a_replayed_cookie_after_logout_is_no_session_and_never_revived(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    gateway = await gateway_factory("redis", REDIS_URL=redis_server.url)
    sid = await start_session(gateway, {"a": 1})
    resp = await gateway.client.delete(SESSION, headers=CSRF)
    assert resp.status == 204 and resp.headers["Cache-Control"] == "no-store"
    replay = {"Cookie": f"agent_sid={sid}"}
    resp = await gateway.client.get(SESSION, headers=replay)
    assert (resp.status, await resp.json()) == (200, {"data": {}})
    assert resp.headers["Cache-Control"] == "no-store"
    resp = await gateway.client.patch(SESSION, json={"b": 2}, headers=CSRF | replay)
    assert (resp.status, await resp.json()) == (200, {"data": {"b": 2}})
    new_sid = gateway.session_id()
    assert new_sid is not None and new_sid != sid, "the logged-out id was reused"
    with contextlib.closing(redis_server.client()) as admin:
        assert admin.exists(gateway.key(sid)) == 0
    await settle(gateway)


# -- R21: SIGTERM under load leaves nothing unclosed ----------------------------------------


async def test_R21_sigterm_with_streams_and_sessions_in_flight_leaves_nothing_unclosed(
    gateway_process: GatewayProcessFactory, redis_server: RedisServer
) -> None:
    """Shutdown order under load, on a real process: open streams end with `shutting_down`,
    sessions written before are intact, exit 0, Redis connections closed last, and no
    "Unclosed ..." / "Task was destroyed" / traceback in the output (ResourceWarnings shown)."""
    proc = gateway_process(
        {
            "SESSION_STORE": "redis",
            "REDIS_URL": redis_server.url,
            "SHUTDOWN_TIMEOUT_SECONDS": "1",
            "DEMO_TOKEN_DELAY_SECONDS": "0.3",
            "PYTHONWARNINGS": "always::ResourceWarning",
        }
    )
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(proc.url, cookie_jar=jar) as http:
        async with http.patch(SESSION, json={"a": 1}, headers=CSRF) as resp:
            assert resp.status == 200
        sid = next(m.value for m in jar if m.key == "agent_sid")
        streams = [
            await http.post("/apps/demo/agent/chat", headers=CSRF, json={"message": "hi " * 50})
            for _ in range(3)
        ]
        for stream in streams:
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")
        proc.signal(signal.SIGTERM)
        bodies = [await stream.read() for stream in streams]
        for stream in streams:
            stream.release()
    for body in bodies:
        assert b"shutting_down" in body.rsplit(b"event: error", 1)[-1]
    assert await asyncio.to_thread(proc.wait, 15) == 0
    stderr = proc.stderr
    for bad in ("Unclosed", "unclosed", "Task was destroyed", "Traceback", "ResourceWarning"):
        assert bad not in stderr, stderr[-3000:]
    assert "agent-bff" not in redis_server.client_names(), "Redis connections left open"
    with contextlib.closing(redis_server.client()) as admin:
        raw = admin.get(f"agent:sess:demo:{sid}")
    assert raw is not None and json.loads(raw)["data"] == {"a": 1}


# -- R22: the memory store with several replicas ---------------------------------------------


@pytest.mark.system
def test_R22_the_local_cluster_refuses_several_replicas_on_the_memory_store(
    tmp_path: Path,
) -> None:
    """Sessions in process memory cannot be shared: `scripts/cluster up` refuses N > 1 with
    the memory store before starting anything (a single process warns at start:
    test_sessions_http.py::test_memory_store_warns_that_it_is_per_process)."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "cluster.py"),
            "--dir",
            str(tmp_path / "cluster"),
            "up",
            "--replicas",
            "2",
            "--store",
            "memory",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "memory" in (done.stdout + done.stderr).lower()
    assert not (tmp_path / "cluster" / "state.json").exists(), "something was started"
