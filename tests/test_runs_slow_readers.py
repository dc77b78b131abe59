"""Readers of a run that read slowly or not at all, through HTTP: the gateway sends a run's
log in pieces and waits for each to drain, so such a reader holds no copy of the whole run
in the gateway's memory (app/runs/feed.py)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from tests.fake_upstream import app_settings, run_gateway
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer
from tests.runs_helpers import SseUpstream

CSRF = {"X-CSRF": "1"}
CHAT = "/apps/shop/agent/chat"
EVENT_BYTES = 512 * 1024


class BigRunUpstream(SseUpstream):
    """An upstream whose answer is `events` events of 512 KiB, all at once, then the end."""

    def __init__(self, events: int) -> None:
        self.events = events

    async def write_events(self, response: web.StreamResponse) -> None:
        await response.write((b"data: " + b"y" * EVENT_BYTES + b"\n\n") * self.events)


def _rss(pid: str = "self") -> int:
    """The resident set size in bytes of process `pid` (default: this one)."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * 4096


async def _silent_reader(host: str, port: int, path: str, cookie: str) -> socket.socket:
    """A connection that asks for `path` and then never reads (a small receive buffer)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    head = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nCookie: {cookie}\r\n\r\n"
    await loop.sock_sendall(sock, head.encode())
    return sock


async def test_readers_that_never_read_hold_no_copy_of_the_run_each() -> None:
    """48 silent readers (8 per run, the per-run limit) of 6 ended 3.5 MiB runs (under the
    default 4 MiB resume_max_bytes): written in one piece, each reader's transport buffer held
    a copy of its run (~170 MiB in all); written in drained pieces, each holds about one
    piece beyond the transport's high-water mark. The bound (64 MiB) is generous."""
    upstream = BigRunUpstream(events=7)
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    try:
        settings = app_settings(
            server.make_url("/v1"),
            {"RUN_HEARTBEAT_SECONDS": "0.1"},
            resumable=True,
            resume_window_seconds=60.0,
        )
        async with run_gateway(settings) as gw:
            runs = []
            for _ in range(6):
                response = await gw.client.post(CHAT, headers=CSRF, json={"message": "hi"})
                assert response.status == 200
                runs.append(response.headers["X-Run-Id"])
                assert len(await response.read()) > 7 * EVENT_BYTES
            cookie = "; ".join(f"{m.key}={m.value}" for m in gw.client.cookie_jar)
            host, port = gw.url.host, gw.url.port
            assert host is not None and port is not None
            before = _rss()
            socks: list[socket.socket] = []
            try:
                for run_id in runs:
                    for _ in range(8):
                        path = f"/apps/shop/runs/{run_id}"
                        socks.append(await _silent_reader(host, port, path, cookie))
                await asyncio.sleep(1.5)
                grown = _rss() - before
            finally:
                for sock in socks:
                    sock.close()
            assert grown < 64 * 1024 * 1024, (
                f"48 silent readers of 6 ended 3.5 MiB runs: gateway RSS +{grown >> 20} MiB"
            )
    finally:
        await server.close()


async def _silent_readers(
    url: str, runs: list[str], cookie: str, per_run: int
) -> list[socket.socket]:
    base = URL(url)
    host, port = base.host, base.port
    assert host is not None and port is not None
    return [
        await _silent_reader(host, port, f"/apps/shop/runs/{run_id}", cookie)
        for run_id in runs
        for _ in range(per_run)
    ]


@pytest.mark.redis_server
async def test_silent_readers_on_another_replica_hold_no_copy_of_the_run_each(
    tier_system: None, tmp_path: Path
) -> None:
    """The same through Redis: 6 ended 3.5 MiB runs pumped by replica A, 48 silent readers on
    replica B (`follow_remote`, XRANGE). A stores the burst in entries of about 256 KiB, B
    reads them a few at a time and writes each batch in drained pieces: each reader holds
    about one 512 KiB event and its read buffers (+50 MiB measured; the whole run in one
    entry, read in one XRANGE: +221 MiB)."""
    upstream = BigRunUpstream(events=7)
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    try:
        with RedisServer() as redis:
            apps = tmp_path / "apps.toml"
            apps.write_text(
                f'[apps.shop]\nupstream = "{server.make_url("/v1")}"\nresumable = true\n'
                "resume_window_seconds = 60\n"
            )
            env = {
                "SESSION_STORE": "redis",
                "REDIS_URL": redis.url,
                "APPS_FILE": str(apps),
                "RUN_HEARTBEAT_SECONDS": "0.25",
            }
            with GatewayProcess(env) as a, GatewayProcess(env) as b:
                jar = aiohttp.CookieJar(unsafe=True)
                async with aiohttp.ClientSession(cookie_jar=jar) as client:
                    runs = []
                    for _ in range(6):
                        async with client.post(
                            f"{a.url}{CHAT}", headers=CSRF, json={"message": "hi"}
                        ) as response:
                            assert response.status == 200
                            runs.append(response.headers["X-Run-Id"])
                            assert len(await response.read()) > 7 * EVENT_BYTES
                    async with client.get(f"{b.url}/apps/shop/runs/{runs[0]}") as check:
                        assert len(await check.read()) > 7 * EVENT_BYTES  # B reads Redis
                    cookie = "; ".join(f"{m.key}={m.value}" for m in jar)
                before = _rss(str(b.pid))
                socks = await _silent_readers(b.url, runs, cookie, 8)
                try:
                    await asyncio.sleep(2.0)
                    grown = _rss(str(b.pid)) - before
                finally:
                    for sock in socks:
                        sock.close()
                assert grown < 112 * 1024 * 1024, (
                    f"48 silent readers on replica B: its RSS +{grown >> 20} MiB"
                )
    finally:
        await server.close()
