"""Session id rotation: `POST /apps/{id}/session/rotate` and an upstream's `X-Session-Rotate: 1`.

The new id carries the data (and the conversation) over; the old id is dead before the response
is sent (its key holds only a rotation tombstone: requests carrying it get 409
`session_rotated`); a write racing the rotation is not lost. Memory store, fakeredis, real
redis-server. Many concurrent writes racing a rotation: `tests/test_session_rotation_race.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from app.keys import STORAGE_APP_KEY
from app.proxy.headers import ROTATE_HEADER, THREAD_HEADER
from app.sessions.backend import SessionBackend, StoreUnavailable
from app.sessions.codec import CREATED_AT, GATEWAY
from tests.backends import WrappedBackend
from tests.conftest import CSRF, Gateway, GatewayFactory
from tests.fake_upstream import ServedUpstream, serve_upstream, sse, start_sse
from tests.test_sessions_http import (
    SID_RE,
    assert_envelope,
    parse_set_cookie,
    patch,
    reset_stats,
    session_commands,
    set_cookie_headers,
    stored,
)

ROTATE = "/apps/demo/session/rotate"


async def assert_tombstone(gateway: Gateway, key: str) -> None:
    """`key` holds a rotation tombstone (no data) that expires within the default 60 s."""
    raw = await gateway.raw.get(key)
    assert raw is not None, "no tombstone at the old id"
    value = json.loads(raw)
    assert set(value) == {"v", "r", "rotated"}, value
    ttl = await gateway.raw.ttl(key)
    assert ttl is not None and 0 < ttl <= 60


async def with_sid(
    gateway: Gateway, method: str, path: str, sid: str | None, body: Any = None
) -> tuple[int, Any, list[str]]:
    """One request carrying only `sid` as the session cookie (not the client's jar)."""
    headers = {**CSRF, **({"Cookie": f"agent_sid={sid}"} if sid else {})}
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.request(method, gateway.client.make_url(path), json=body, headers=headers) as resp,
    ):
        payload = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, payload, set_cookie_headers(resp)


async def rotate(gateway: Gateway, **headers: str) -> tuple[int, dict[str, Any], list[str]]:
    resp = await gateway.client.post(ROTATE, headers={**CSRF, **headers})
    return resp.status, await resp.json(), set_cookie_headers(resp)


# -- the endpoint ---------------------------------------------------------------------------


async def test_rotate_moves_the_data_to_a_new_id_and_kills_the_old(gateway: Gateway) -> None:
    await patch(gateway.client, {"cart": [1, 2]})
    old = gateway.session_id()
    assert old is not None
    before = await stored(gateway, old)

    resp = await gateway.client.post(ROTATE, headers=CSRF)
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    assert await resp.json() == {"data": {"cart": [1, 2]}, "rotated": True}
    (header,) = set_cookie_headers(resp)
    name, new, attrs = parse_set_cookie(header)
    assert name == "agent_sid" and SID_RE.match(new) and new != old
    assert attrs["path"] == "/apps/demo" and attrs["httponly"] is True
    assert gateway.session_id() == new

    # The old key holds only a tombstone, the new one the same data and gateway fields.
    assert sorted(await gateway.raw.keys()) == sorted([gateway.key(new), gateway.key(old)])
    await assert_tombstone(gateway, gateway.key(old))
    after = await stored(gateway, new)
    assert after["data"] == before["data"]
    assert after[GATEWAY] == before[GATEWAY]  # created_at kept: no extension of the lifetime
    assert after["r"] > before["r"]

    # The old id reads nothing (409, cookie untouched); the new one is the session.
    status, body, cookies = await with_sid(gateway, "GET", "/apps/demo/session", old)
    assert (status, body["error"]["code"], cookies) == (409, "session_rotated", [])
    resp = await gateway.client.get("/apps/demo/session")
    assert await resp.json() == {"data": {"cart": [1, 2]}}


async def test_a_write_with_the_old_id_does_not_come_back(gateway: Gateway) -> None:
    await patch(gateway.client, {"a": 1})
    old = gateway.session_id()
    await rotate(gateway)
    new = gateway.session_id()
    # While its tombstone lives: 409 session_rotated, the browser's new cookie untouched.
    for method in ("PATCH", "GET", "POST"):
        path = ROTATE if method == "POST" else "/apps/demo/session"
        status, body, cookies = await with_sid(gateway, method, path, old, {"evil": 1})
        assert (status, body["error"]["code"], cookies) == (409, "session_rotated", [])
    assert old is not None
    await assert_tombstone(gateway, gateway.key(old))
    # Once it expired (what its TTL does): a fresh session under a third id, the old id was
    # never adopted again.
    await gateway.raw.delete(gateway.key(old))
    status, _, cookies = await with_sid(gateway, "PATCH", "/apps/demo/session", old, {"evil": 1})
    assert status == 200
    (header,) = cookies
    _, third, _ = parse_set_cookie(header)
    assert third not in (old, new)
    assert new is not None
    assert (await stored(gateway, new))["data"] == {"a": 1}


async def test_rotate_without_a_session_creates_nothing(gateway: Gateway) -> None:
    for sid in (None, "U" * 43):
        reply = await with_sid(gateway, "POST", ROTATE, sid)
        assert reply == (200, {"data": {}, "rotated": False}, [])
    assert await gateway.raw.keys() == []


@pytest.mark.parametrize("csrf", [None, "0"])
async def test_rotate_needs_the_csrf_header(gateway: Gateway, csrf: str | None) -> None:
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    headers = {} if csrf is None else {"X-CSRF": csrf}
    resp = await gateway.client.post(ROTATE, headers=headers)
    assert resp.status == 403
    assert_envelope(resp, await resp.json(), "csrf_header_missing")
    assert sid is not None
    assert await gateway.raw.keys() == [gateway.key(sid)]


async def test_rotate_keeps_the_absolute_deadline(
    gateway_factory: GatewayFactory, kind: str
) -> None:
    gateway = await gateway_factory(kind, SESSION_TTL_SECONDS="600", SESSION_ABSOLUTE_SECONDS="30")
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    created = (await stored(gateway, sid))[GATEWAY][CREATED_AT]
    await rotate(gateway)
    new = gateway.session_id()
    assert new is not None and new != sid
    assert (await stored(gateway, new))[GATEWAY][CREATED_AT] == created
    ttl = await gateway.raw.ttl(gateway.key(new))
    assert ttl is not None and ttl <= 30


async def test_rotate_commands_on_redis(redis_gateway: Gateway) -> None:
    server = redis_gateway.redis_server
    assert server is not None
    await patch(redis_gateway.client, {"a": 1})
    await rotate(redis_gateway)  # loads the scripts
    reset_stats(server)
    status, _, _ = await rotate(redis_gateway)
    assert status == 200
    # Load (GETEX), new key (SET NX), the old one replaced by the tombstone (SET XX GET EX).
    # Single-key commands only: fine on Redis Cluster.
    assert session_commands(server) == {"getex": 1, "set": 2}


class RacingBackend(WrappedBackend):
    """Wraps a backend: before the first `replace` (the tombstone), another request writes the
    session (as a PATCH on another replica would, between the copy and the tombstone)."""

    def __init__(self, inner: SessionBackend, write: Any) -> None:
        super().__init__(inner)
        self.write = write
        self.raced = 0
        self.fail_delete = False

    async def replace(self, key: str, value: bytes, ttl: int) -> bytes | None:
        if self.fail_delete:
            raise StoreUnavailable("ConnectionError: simulated")
        if not self.raced:
            self.raced += 1
            await self.write(key)
        return await self.inner.replace(key, value, ttl)


def failing_rotation(gateway: Gateway) -> RacingBackend:
    """Make the store fail the rotation's last step (`replace` raises
    StoreUnavailable) until the returned wrapper's `fail_delete` is cleared."""
    storage = gateway.app[STORAGE_APP_KEY]

    async def nothing(key: str) -> None:
        return None

    racing = RacingBackend(storage.backend, nothing)
    racing.fail_delete = True
    storage.backend = racing
    return racing


async def test_a_write_racing_the_rotation_is_carried_over(gateway: Gateway) -> None:
    await patch(gateway.client, {"a": 1})
    old = gateway.session_id()
    assert old is not None
    storage = gateway.app[STORAGE_APP_KEY]

    async def concurrent_patch(key: str) -> None:
        raw = await gateway.raw.get(key)
        assert raw is not None
        value = json.loads(raw)
        value["r"] += 1
        value["data"]["b"] = "written meanwhile"
        ttl = await gateway.raw.ttl(key)
        await gateway.raw.set(
            key, json.dumps(value, separators=(",", ":")).encode(), int(ttl or 60)
        )

    racing = RacingBackend(storage.backend, concurrent_patch)
    storage.backend = racing
    status, body, cookies = await rotate(gateway)
    assert racing.raced == 1
    assert status == 200
    assert body == {"data": {"a": 1, "b": "written meanwhile"}, "rotated": True}
    assert len(cookies) == 1
    new = gateway.session_id()
    assert new is not None and new != old
    # The new key holds both writes (the racing one copied over); the old one a tombstone.
    assert sorted(await gateway.raw.keys()) == sorted([gateway.key(new), gateway.key(old)])
    await assert_tombstone(gateway, gateway.key(old))
    assert (await stored(gateway, new))["data"] == {"a": 1, "b": "written meanwhile"}


async def test_a_store_failure_during_rotation_keeps_the_old_id(gateway: Gateway) -> None:
    await patch(gateway.client, {"a": 1})
    old = gateway.session_id()
    assert old is not None
    racing = failing_rotation(gateway)
    resp = await gateway.client.post(ROTATE, headers=CSRF)
    assert resp.status == 503
    assert_envelope(resp, await resp.json(), "session_store_unavailable")
    assert set_cookie_headers(resp) == []  # the browser keeps its (still valid) id
    assert gateway.session_id() == old
    assert await gateway.raw.keys() == [gateway.key(old)]  # the new copy was removed
    racing.fail_delete = False
    assert await (await gateway.client.get("/apps/demo/session")).json() == {"data": {"a": 1}}


# -- X-Session-Rotate from the upstream ------------------------------------------------------


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> ServedUpstream:
    served = await serve_upstream(aiohttp_server)

    async def login(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request, **{ROTATE_HEADER: "1"})
        await response.write(sse("token", {"text": "welcome"}) + sse("done", {}))
        await response.write_eof()
        return response

    async def chat(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    served.fake.on("/v1/login", login)
    served.fake.on("/v1/chat", chat)
    return served


@pytest.fixture
async def agent_gateway(
    gateway_factory: GatewayFactory, upstream: ServedUpstream, tmp_path: Path, kind: str
) -> Gateway:
    path = tmp_path / "apps.toml"
    path.write_text(f'[apps.shop]\nupstream = "{upstream.base}"\n')
    return await gateway_factory(kind, APPS_FILE=str(path))


async def test_upstream_rotate_header_rotates_before_the_response(
    agent_gateway: Gateway, upstream: ServedUpstream
) -> None:
    gw = agent_gateway
    resp = await gw.client.post("/apps/shop/agent/chat", headers=CSRF)
    assert resp.status == 200
    await patch(gw.client, {"user": "anon"}, "shop")
    old = gw.session_id("shop")
    assert old is not None
    thread = upstream.fake.last.headers[THREAD_HEADER]

    async with gw.client.post("/apps/shop/agent/login", headers=CSRF) as resp:
        assert resp.status == 200
        assert ROTATE_HEADER not in resp.headers, "the signal leaked to the browser"
        (header,) = set_cookie_headers(resp)
        _, new, attrs = parse_set_cookie(header)
        assert attrs["path"] == "/apps/shop"
        # The old id is already dead while the body is still streaming.
        await assert_tombstone(gw, gw.key(old, "shop"))
        assert b"welcome" in await resp.read()
    assert new != old and SID_RE.match(new)
    assert gw.session_id("shop") == new
    value = await stored(gw, new, "shop")
    assert value["data"] == {"user": "anon"}
    assert value[GATEWAY]["conversation_id"] == thread  # the conversation carries over

    resp = await gw.client.post("/apps/shop/agent/chat", headers=CSRF)
    assert resp.status == 200
    assert upstream.fake.last.headers[THREAD_HEADER] == thread
    status, body, _ = await with_sid(gw, "GET", "/apps/shop/session", old)
    assert (status, body["error"]["code"]) == (409, "session_rotated")


async def test_upstream_rotate_on_the_first_agent_request(
    agent_gateway: Gateway, upstream: ServedUpstream
) -> None:
    """The session created by this very request is rotated too: one cookie, the final id."""
    gw = agent_gateway
    async with gw.client.post("/apps/shop/agent/login", headers=CSRF) as resp:
        assert resp.status == 200
        (header,) = set_cookie_headers(resp)
        _, sid, _ = parse_set_cookie(header)
        await resp.read()
    keys = await gw.raw.keys()
    assert len(keys) == 2 and gw.key(sid, "shop") in keys  # and the first id's tombstone
    (first,) = [k for k in keys if k != gw.key(sid, "shop")]
    await assert_tombstone(gw, first)


async def test_a_failed_rotation_on_the_first_agent_request_keeps_the_cookie(
    agent_gateway: Gateway, upstream: ServedUpstream
) -> None:
    """The request created the session, then the rotation failed: the error must still set
    the cookie of the session that exists, or that key would be orphaned (and the upstream
    has already acted on its conversation)."""
    gw = agent_gateway
    racing = failing_rotation(gw)
    resp = await gw.client.post("/apps/shop/agent/login", headers=CSRF)
    assert resp.status == 503
    assert_envelope(resp, await resp.json(), "session_store_unavailable")
    (header,) = set_cookie_headers(resp)
    _, sid, attrs = parse_set_cookie(header)
    assert attrs["path"] == "/apps/shop"
    # Only the session this request created; the rotated copy was removed again.
    assert await gw.raw.keys() == [gw.key(sid, "shop")]
    thread = upstream.fake.last.headers[THREAD_HEADER]
    assert (await stored(gw, sid, "shop"))[GATEWAY]["conversation_id"] == thread

    racing.fail_delete = False
    resp = await gw.client.post("/apps/shop/agent/chat", headers=CSRF)
    assert resp.status == 200
    assert upstream.fake.last.headers[THREAD_HEADER] == thread
    assert gw.session_id("shop") == sid


@pytest.mark.parametrize("value", ["0", "true", "yes", ""])
async def test_other_rotate_header_values_do_nothing(
    agent_gateway: Gateway, upstream: ServedUpstream, value: str
) -> None:
    async def maybe(request: web.Request) -> web.Response:
        return web.json_response({}, headers={ROTATE_HEADER: value})

    upstream.fake.on("/v1/maybe", maybe)
    gw = agent_gateway
    await gw.client.post("/apps/shop/agent/chat", headers=CSRF)
    sid = gw.session_id("shop")
    resp = await gw.client.post("/apps/shop/agent/maybe", headers=CSRF)
    assert resp.status == 200
    assert ROTATE_HEADER not in resp.headers
    assert set_cookie_headers(resp) == []
    assert gw.session_id("shop") == sid


async def test_an_agent_request_with_the_rotated_id_is_409_and_never_reaches_the_upstream(
    agent_gateway: Gateway, upstream: ServedUpstream
) -> None:
    gw = agent_gateway
    resp = await gw.client.post("/apps/shop/agent/chat", headers=CSRF)
    assert resp.status == 200
    old = gw.session_id("shop")
    async with gw.client.post("/apps/shop/agent/login", headers=CSRF) as resp:
        assert resp.status == 200
        await resp.read()
    seen = len(upstream.fake.seen)
    status, body, cookies = await with_sid(gw, "POST", "/apps/shop/agent/chat", old)
    assert (status, body["error"]["code"], cookies) == (409, "session_rotated", [])
    assert len(upstream.fake.seen) == seen, "the old id reached the upstream"
    resp = await gw.client.post("/apps/shop/agent/chat", headers=CSRF)  # the new id works
    assert resp.status == 200
