"""Real `python -m app` processes: replicas sharing one real Redis, startup failures with their
exit codes and messages, and a graceful SIGTERM. Plus the shutdown lifecycle in-process
(readiness during the drain, Redis closed at cleanup), which a process hides from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from app.__main__ import serve
from app.keys import BACKEND_KEY, LIFECYCLE_KEY
from app.lifecycle import Lifecycle, drain_on_shutdown
from app.loadkit.ports import free_port
from app.main import create_app
from app.sessions.backend import SessionBackend
from app.sessions.memory import MemoryBackend
from app.sessions.redis import RedisBackend
from tests.conftest import CSRF, GatewayFactory, GatewayProcessFactory, make_settings
from tests.gateway_process import GatewayProcess, run_gateway_to_exit
from tests.redis_server import RedisServer

# -- replicas ------------------------------------------------------------------------------


async def test_two_gateways_share_sessions_through_one_redis(
    gateway_process: GatewayProcessFactory, shared_redis: RedisServer
) -> None:
    env = {"SESSION_STORE": "redis", "REDIS_URL": shared_redis.url}
    one, two = gateway_process(env), gateway_process(env)
    # Cookies ignore ports: one browser jar talks to both replicas, as behind a load balancer.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        resp = await browser.patch(
            f"{one.url}/apps/demo/session", json={"cart": ["apple"]}, headers=CSRF
        )
        assert resp.status == 200
        resp = await browser.get(f"{two.url}/apps/demo/session")
        assert await resp.json() == {"data": {"cart": ["apple"]}}

        resp = await browser.patch(f"{two.url}/apps/demo/session", json={"n": 2}, headers=CSRF)
        assert resp.status == 200
        resp = await browser.get(f"{one.url}/apps/demo/session")
        assert await resp.json() == {"data": {"cart": ["apple"], "n": 2}}

        # Logout on one replica is logout everywhere.
        resp = await browser.delete(f"{one.url}/apps/demo/session", headers=CSRF)
        assert resp.status == 204
        resp = await browser.get(f"{two.url}/apps/demo/session")
        assert await resp.json() == {"data": {}}
    assert one.stop() == 0 and two.stop() == 0


# -- startup failures ----------------------------------------------------------------------


def config_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.system
def test_missing_redis_url_exits_2_with_one_line() -> None:
    code, stderr, _ = run_gateway_to_exit({"SESSION_STORE": "redis"})
    assert code == 2
    lines = config_lines(stderr)
    assert len(lines) == 1, stderr
    assert "REDIS_URL" in lines[0]


@pytest.mark.system
def test_bad_values_exit_2_with_one_line_per_problem() -> None:
    code, stderr, _ = run_gateway_to_exit(
        {
            "SESSION_STORE": "disk",
            "SESSION_TTL_SECONDS": "0",
            "SESSION_COOKIE_SAMESITE": "Sometimes",
            "APPS_FILE": "/nonexistent/apps.toml",
        }
    )
    assert code == 2
    lines = config_lines(stderr)
    assert len(lines) == 4, stderr
    for name in ("SESSION_STORE", "SESSION_TTL_SECONDS", "SESSION_COOKIE_SAMESITE", "APPS_FILE"):
        assert sum(name in line for line in lines) == 1, (name, stderr)


@pytest.mark.system
def test_a_bad_value_in_dotenv_exits_2(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SESSION_TTL_SECONDS=soon\n")
    proc = GatewayProcess({}, cwd=tmp_path)
    try:
        proc.spawn()
        assert proc.wait(15) == 2
        lines = config_lines(proc.stderr)
        assert len(lines) == 1 and "SESSION_TTL_SECONDS" in lines[0], proc.stderr
    finally:
        proc.close()


@pytest.mark.system
def test_a_password_is_never_printed_on_config_errors() -> None:
    code, stderr, _ = run_gateway_to_exit(
        {"SESSION_STORE": "redis", "REDIS_URL": "redis://:hunter2@localhost:99999/0"}
    )
    assert code == 2
    assert "REDIS_URL" in stderr
    assert "hunter2" not in stderr


@pytest.mark.system
def test_redis_down_at_start_exits_1_within_10s() -> None:
    # The production timeouts (no test defaults): what ships must fail fast.
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    code, stderr, seconds = run_gateway_to_exit(
        {"SESSION_STORE": "redis", "REDIS_URL": url, "HOST": "127.0.0.1"},
        defaults=False,
        timeout=20,
    )
    assert code == 1, stderr
    assert seconds < 10, f"took {seconds:.1f}s"
    assert "REDIS_URL" in stderr
    assert "hunter2" not in stderr
    assert "redis://:***@127.0.0.1" in stderr
    assert "troubleshooting" in stderr.lower()


@pytest.mark.system
def test_a_frozen_redis_at_start_exits_1_without_ever_listening(
    redis_server: RedisServer,
) -> None:
    """A black-holed Redis (no RST, no answer) with the production timeouts: exit 1 < 10 s."""
    redis_server.pause()
    proc = GatewayProcess(
        {"SESSION_STORE": "redis", "REDIS_URL": redis_server.url, "HOST": "127.0.0.1"},
        defaults=False,
    )
    try:
        started = time.monotonic()
        proc.spawn()
        # While the start check waits for Redis, the port is not open.
        while proc.returncode is None:
            with socket.socket() as sock:
                sock.settimeout(0.2)
                assert sock.connect_ex(("127.0.0.1", proc.port)) != 0, "listening before ready"
            time.sleep(0.05)
        assert proc.wait(1) == 1
        assert time.monotonic() - started < 10
        assert "REDIS_URL" in proc.stderr
    finally:
        proc.close()
        redis_server.resume()


# -- graceful shutdown ---------------------------------------------------------------------


async def read_status(reader: asyncio.StreamReader) -> int:
    line = await reader.readline()
    return int(line.split()[1])


async def test_sigterm_finishes_in_flight_requests_then_exits_0(
    gateway_process: GatewayProcessFactory, redis_server: RedisServer
) -> None:
    proc = gateway_process(
        {
            "SESSION_STORE": "redis",
            "REDIS_URL": redis_server.url,
            "SHUTDOWN_TIMEOUT_SECONDS": "10",
        }
    )
    # Open the gateway's pool (the start check connection may be the only one so far).
    assert proc.get_status("/apps/demo/session") == 200
    assert "agent-bff" in redis_server.client_names()

    # A keep-alive connection a load balancer holds open (one request done, idle).
    lb_reader, lb_writer = await asyncio.open_connection("127.0.0.1", proc.port)
    lb_writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    await lb_writer.drain()
    assert await read_status(lb_reader) == 200
    length = 0
    while (line := await lb_reader.readline()) != b"\r\n":
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await lb_reader.readexactly(length)

    # A PATCH in flight: headers sent, body still coming when SIGTERM arrives.
    reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
    body = b'{"a": "written during the drain"}'
    writer.write(
        b"PATCH /apps/demo/session HTTP/1.1\r\nHost: gw\r\nX-CSRF: 1\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    await writer.drain()
    assert await read_status(reader) == 100  # routed: the handler is running
    await reader.readline()

    proc.signal(signal.SIGTERM)

    # The listener closes at once: new connections are refused.
    async with asyncio.timeout(5):
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", proc.port)) != 0:
                    break
            await asyncio.sleep(0.02)
    assert proc.returncode is None, "it must wait for the request in flight"

    # Draining: readiness says 503 to whoever still asks on an open connection, and that
    # response closes the connection.
    lb_writer.write(b"GET /readyz HTTP/1.1\r\nHost: gw\r\n\r\n")
    await lb_writer.drain()
    async with asyncio.timeout(5):
        assert await read_status(lb_reader) == 503
        rest_lb = await lb_reader.read()  # until the server closes the connection
    lb_writer.close()
    assert b"connection: close" in rest_lb.lower()
    assert b"shutting_down" in rest_lb

    writer.write(body)
    await writer.drain()
    async with asyncio.timeout(10):
        status = await read_status(reader)
        rest = await reader.read()
    writer.close()
    assert status == 200, rest
    assert b"agent_sid=" in rest
    # Redis was still open for it (it closes last): the session is stored.
    with contextlib.closing(redis_server.client()) as client:
        keys = client.keys("agent:sess:demo:*")
        assert len(keys) == 1
        assert b"written during the drain" in (client.get(keys[0]) or b"")

    assert proc.wait(15) == 0, proc.stderr
    assert "agent-bff" not in redis_server.client_names()


# -- the lifecycle in-process --------------------------------------------------------------


@contextlib.asynccontextmanager
async def in_flight(lifecycle: Lifecycle) -> AsyncIterator[None]:
    """A request in flight for the block's duration, as the gateway middleware counts one."""
    lifecycle.request_started()
    try:
        yield
    finally:
        lifecycle.request_finished()


async def test_readyz_is_503_while_draining(aiohttp_client: AiohttpClient) -> None:
    app = create_app(make_settings(SHUTDOWN_TIMEOUT_SECONDS="5"))
    client = await aiohttp_client(app)
    assert (await client.get("/readyz")).status == 200
    lifecycle = app[LIFECYCLE_KEY]
    async with in_flight(lifecycle):  # a request in flight keeps the drain waiting
        drain = asyncio.create_task(drain_on_shutdown(app))
        await asyncio.sleep(0)
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert (await resp.json())["status"] == "shutting_down"
        assert (await client.get("/healthz")).status == 200
        assert not drain.done()
        assert not lifecycle.stop_streams.is_set()
    async with asyncio.timeout(5):
        await drain
    assert lifecycle.stop_streams.is_set()


async def test_drain_gives_up_after_the_shutdown_timeout(aiohttp_client: AiohttpClient) -> None:
    app = create_app(make_settings(SHUTDOWN_TIMEOUT_SECONDS="0.3"))
    await aiohttp_client(app)
    lifecycle = app[LIFECYCLE_KEY]
    async with in_flight(lifecycle):  # never finishes by itself
        started = time.monotonic()
        await drain_on_shutdown(app)
        assert 0.25 < time.monotonic() - started < 3
        # Streams still open are told to end now (with `event: error` shutting_down).
        assert lifecycle.stop_streams.is_set()


async def test_redis_connections_are_closed_at_cleanup(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    gateway = await gateway_factory("redis", REDIS_URL=redis_server.url)
    await gateway.client.patch("/apps/demo/session", json={"a": 1}, headers=CSRF)
    assert "agent-bff" in redis_server.client_names()
    await gateway.client.close()  # runs the app's shutdown and cleanup
    async with asyncio.timeout(5):
        while "agent-bff" in redis_server.client_names():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_startup_failure_after_the_store_opened_closes_the_store(
    redis_server: RedisServer, store: str
) -> None:
    """A later startup step failing (upstream client, demo agent...) must still close what
    opened before it: the Redis pool, the memory sweeper task."""
    settings = make_settings(SESSION_STORE=store, REDIS_URL=redis_server.url, PORT=str(free_port()))
    app = create_app(settings)
    opened: list[SessionBackend] = []

    async def failing_step(app: web.Application) -> AsyncIterator[None]:
        backend = app[BACKEND_KEY]
        if isinstance(backend, RedisBackend):
            await backend.ping()  # a pooled connection exists now
            assert "agent-bff" in redis_server.client_names()
        opened.append(backend)
        raise RuntimeError("a later startup step failed")
        yield

    app.cleanup_ctx.append(failing_step)
    with pytest.raises(RuntimeError, match="later startup step failed"):
        await serve(app, settings)
    [backend] = opened
    if isinstance(backend, MemoryBackend):
        assert backend._sweeper is None  # cancelled and awaited by close()
    else:
        async with asyncio.timeout(5):
            while "agent-bff" in redis_server.client_names():
                await asyncio.sleep(0.02)


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_sigterm_when_idle_exits_0(
    gateway_process: GatewayProcessFactory, shared_redis: RedisServer, store: str
) -> None:
    env = {"SESSION_STORE": store}
    if store == "redis":
        env["REDIS_URL"] = shared_redis.url
    proc = gateway_process(env)
    started = time.monotonic()
    assert proc.stop() == 0, proc.stderr
    assert time.monotonic() - started < 5
    assert "Traceback" not in proc.stderr
