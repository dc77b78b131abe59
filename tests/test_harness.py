"""The test harness itself: a real redis-server can be killed, restarted (AOF reloaded), frozen,
and every in-process gateway kind answers."""

from __future__ import annotations

import contextlib
import signal

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.conftest import CSRF, Gateway, GatewayProcessFactory
from tests.redis_server import RedisServer


@pytest.mark.integration
def test_kill_restart_keeps_port_and_reloads_aof() -> None:
    with RedisServer(appendonly=True, extra_args=["--appendfsync", "always"]) as server:
        port, pid = server.port, server.pid
        with contextlib.closing(server.client()) as client:
            client.set(b"k", b"v")
        server.kill(signal.SIGKILL)
        assert not server.running
        with (
            contextlib.closing(server.client(socket_timeout=0.5)) as client,
            pytest.raises(RedisConnectionError),
        ):
            client.ping()
        server.restart()
        assert server.port == port and server.pid != pid
        with contextlib.closing(server.client()) as client:
            assert client.get(b"k") == b"v"


def test_pause_freezes_and_resume_thaws(redis_server: RedisServer) -> None:
    redis_server.pause()
    with contextlib.closing(redis_server.client(socket_timeout=0.3)) as client:
        with pytest.raises((RedisTimeoutError, RedisConnectionError)):
            client.ping()
        redis_server.resume()
        assert client.ping()


@pytest.mark.integration
def test_password_and_command_calls() -> None:
    with RedisServer(password="s3cret") as server:
        assert ":s3cret@" in server.url
        with contextlib.closing(server.client()) as client:
            client.config_resetstat()
            client.set(b"a", b"1")
            client.getex(b"a", ex=5)
        assert server.command_calls()["getex"] == 1


async def test_every_gateway_kind_round_trips(gateway: Gateway) -> None:
    resp = await gateway.client.patch("/apps/demo/session", json={"a": 1}, headers=CSRF)
    assert resp.status == 200
    sid = gateway.session_id("demo")
    assert sid is not None
    assert await gateway.raw.get(gateway.key(sid)) is not None


def test_gateway_process_starts_and_stops(gateway_process: GatewayProcessFactory) -> None:
    proc = gateway_process({"SESSION_STORE": "memory"})
    assert proc.get_status("/healthz") == 200
    assert proc.stop() == 0
