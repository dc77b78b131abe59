"""The session binds the conversation: minted by the gateway on the first agent request, saved
before the response starts (streams included), stable for the session, never chosen by the
browser, new after logout. Run on every store: memory, fakeredis, a real redis-server."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from app.proxy.headers import APPLICATION_HEADER, THREAD_HEADER
from tests.conftest import CSRF, STORE_KINDS, Gateway, GatewayFactory
from tests.fake_upstream import ServedUpstream, serve_upstream, sse, start_sse
from tests.redis_server import RedisServer

CHAT = "/apps/shop/agent/chat"


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> ServedUpstream:
    served = await serve_upstream(aiohttp_server)

    async def chat(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse("token", {"text": "hi"}) + sse("done", {}))
        await response.write_eof()
        return response

    served.fake.on("/v1/chat", chat)
    return served


def write_apps_file(tmp_path: Path, upstream: ServedUpstream) -> str:
    path = tmp_path / "apps.toml"
    path.write_text(
        f"""
[apps.shop]
upstream = "{upstream.base}"
connect_timeout_seconds = 0.25

[apps.blog]
upstream = "{upstream.base}"
"""
    )
    return str(path)


@pytest.fixture(params=STORE_KINDS)
async def gw(
    request: pytest.FixtureRequest,
    gateway_factory: GatewayFactory,
    upstream: ServedUpstream,
    tmp_path: Path,
) -> Gateway:
    kind: str = request.param
    return await gateway_factory(kind, APPS_FILE=write_apps_file(tmp_path, upstream))


async def stored(gw: Gateway, app_id: str = "shop") -> dict[str, Any]:
    sid = gw.session_id(app_id)
    assert sid is not None, "no session cookie"
    raw = await gw.raw.get(gw.key(sid, app_id))
    assert raw is not None, "no stored session"
    value: dict[str, Any] = json.loads(raw)
    return value


async def chat(gw: Gateway, upstream: ServedUpstream, **headers: str) -> str:
    """One streamed agent call; the conversation id the upstream received."""
    async with gw.client.post(CHAT, headers={**CSRF, **headers}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert (await resp.read()).endswith(b"event: done\ndata: {}\n\n")
    return upstream.fake.last.headers[THREAD_HEADER]


async def test_first_agent_request_mints_the_conversation_and_saves_the_session(
    gw: Gateway, upstream: ServedUpstream
) -> None:
    assert gw.session_id("shop") is None
    async with gw.client.post(CHAT, headers=CSRF) as resp:
        assert resp.status == 200
        cookie = resp.cookies["agent_sid"]  # set on the streamed response
        assert cookie["path"] == "/apps/shop" and cookie["httponly"]
        await resp.read()
    thread = upstream.fake.last.headers[THREAD_HEADER]
    assert upstream.fake.last.headers[APPLICATION_HEADER] == "shop"
    sid = gw.session_id("shop")
    assert sid is not None and sid == cookie.value
    value = await stored(gw)
    assert value["gw"]["conversation_id"] == thread
    assert value["data"] == {}
    # Random and unrelated to the session id (which must never reach the upstream).
    assert thread != sid and thread not in sid and sid not in thread
    assert all(sid not in v for v in upstream.fake.last.headers.values())
    # Gateway-owned: not visible through the session API.
    async with gw.client.get("/apps/shop/session") as resp:
        assert await resp.json() == {"data": {}}

    for _ in range(3):
        async with gw.client.post(CHAT, headers=CSRF) as resp:
            assert "Set-Cookie" not in resp.headers, "an unchanged session is not re-saved"
            await resp.read()
        assert upstream.fake.last.headers[THREAD_HEADER] == thread
    assert gw.session_id("shop") == sid
    assert (await stored(gw))["gw"]["conversation_id"] == thread


async def test_the_browser_cannot_choose_the_conversation(
    gw: Gateway, upstream: ServedUpstream
) -> None:
    thread = await chat(
        gw, upstream, **{THREAD_HEADER: "browser-picked", APPLICATION_HEADER: "blog"}
    )
    assert thread != "browser-picked"
    assert upstream.fake.last.headers.getall(APPLICATION_HEADER) == ["shop"]
    patch = {"conversation_id": "browser-picked", "gw": {"conversation_id": "browser-picked"}}
    async with gw.client.patch("/apps/shop/session", json=patch, headers=CSRF) as resp:
        assert resp.status == 200
    assert await chat(gw, upstream, **{THREAD_HEADER: "browser-picked"}) == thread
    value = await stored(gw)
    assert value["gw"]["conversation_id"] == thread
    assert value["data"] == patch  # browser data lives beside the gateway's fields


async def test_logout_starts_a_new_conversation(gw: Gateway, upstream: ServedUpstream) -> None:
    first = await chat(gw, upstream)
    first_sid = gw.session_id("shop")
    assert first_sid is not None
    async with gw.client.delete("/apps/shop/session", headers=CSRF) as resp:
        assert resp.status == 204
    assert await gw.raw.get(gw.key(first_sid, "shop")) is None
    second = await chat(gw, upstream)
    assert second != first
    assert gw.session_id("shop") not in (None, first_sid)
    assert await chat(gw, upstream) == second


async def test_each_application_has_its_own_session_and_conversation(
    gw: Gateway, upstream: ServedUpstream
) -> None:
    shop = await chat(gw, upstream)
    async with gw.client.post("/apps/blog/agent/chat", headers=CSRF) as resp:
        assert resp.status == 200
        await resp.read()
    blog = upstream.fake.last.headers[THREAD_HEADER]
    assert upstream.fake.last.headers[APPLICATION_HEADER] == "blog"
    assert blog != shop
    assert gw.session_id("shop") != gw.session_id("blog")
    assert (await stored(gw, "blog"))["gw"]["conversation_id"] == blog


async def test_an_agent_request_slides_the_session_ttl(
    gw: Gateway, upstream: ServedUpstream
) -> None:
    await chat(gw, upstream)
    sid = gw.session_id("shop")
    assert sid is not None
    key = gw.key(sid, "shop")
    raw = await gw.raw.get(key)
    assert raw is not None
    await gw.raw.set(key, raw, 5)
    await chat(gw, upstream)
    ttl = await gw.raw.ttl(key)
    assert ttl is not None and ttl > gw.settings.session_ttl_seconds - 60


async def test_the_conversation_outlives_a_failed_first_request(
    gw: Gateway, upstream: ServedUpstream
) -> None:
    calls = 0

    async def slow_once(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(60)  # past connect_timeout_seconds: 504
        return web.json_response({"ok": True})

    upstream.fake.on("/v1/slow", slow_once)
    async with gw.client.post("/apps/shop/agent/slow", headers=CSRF) as resp:
        assert resp.status == 504
        assert "agent_sid" in resp.cookies, "the session minted for this request is kept"
    attempted = upstream.fake.last.headers[THREAD_HEADER]
    async with gw.client.post("/apps/shop/agent/slow", headers=CSRF) as resp:
        assert resp.status == 200
    assert upstream.fake.last.headers[THREAD_HEADER] == attempted


async def test_session_store_down_means_503_before_the_upstream_is_called(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    upstream: ServedUpstream,
    tmp_path: Path,
) -> None:
    gw = await gateway_factory(
        "redis", REDIS_URL=redis_server.url, APPS_FILE=write_apps_file(tmp_path, upstream)
    )
    async with gw.client.post(CHAT, headers=CSRF) as resp:
        assert resp.status == 200
        await resp.read()
    redis_server.kill(signal.SIGKILL)
    started = time.monotonic()
    async with gw.client.post(CHAT, headers=CSRF) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "session_store_unavailable"
        assert "Retry-After" in resp.headers
    assert time.monotonic() - started < 3
    assert len(upstream.fake.seen) == 1, "no agent call without its session"
