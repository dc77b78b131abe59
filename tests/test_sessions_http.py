"""The session API through HTTP, on the memory store, fakeredis and a real redis-server.

What the browser sees (data, cookie, errors) and what the store holds (key, value, TTL, and on
the real server the exact Redis commands each request costs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from app.keys import STORAGE_APP_KEY
from app.main import create_app
from app.sessions.backend import SessionBackend
from app.sessions.codec import DATA, FORMAT_VERSION, GATEWAY
from app.sessions.middleware import commit_session, get_session
from tests.backends import WrappedBackend
from tests.conftest import CSRF, Gateway, GatewayFactory, make_settings
from tests.fake_upstream import send_and_read_head, stall_and_time_close
from tests.redis_server import RedisServer

SID_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
UNKNOWN_SID = "U" * 43
SESSION_COMMANDS = (
    "get",
    "getex",
    "set",
    "setex",
    "expire",
    "pexpire",
    "del",
    "unlink",
    "exists",
    "eval",
    "evalsha",
    "pttl",
)
# INFO commandstats also counts the commands a script runs inside Redis: an update's one
# round trip (EVALSHA of the compare-and-set script) shows as evalsha + get + set.
CAS_UPDATE = {"evalsha": 1, "get": 1, "set": 1}


# -- helpers --------------------------------------------------------------------------------


def set_cookie_headers(resp: ClientResponse) -> list[str]:
    return resp.headers.getall("Set-Cookie", [])


def parse_set_cookie(header: str) -> tuple[str, str, dict[str, str | bool]]:
    """(name, value, attributes with lower-case names) of one Set-Cookie header."""
    jar: SimpleCookie = SimpleCookie()
    jar.load(header)
    ((name, morsel),) = jar.items()
    attrs: dict[str, str | bool] = {}
    for part in header.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        attrs[key.lower()] = value if _ else True
    return name, morsel.value, attrs


async def patch(
    client: TestClient[web.Request, web.Application],
    body: Any,
    app_id: str = "demo",
    **headers: str,
) -> ClientResponse:
    return await client.patch(f"/apps/{app_id}/session", json=body, headers={**CSRF, **headers})


async def idle_session(gateway: Gateway, ttl_left: int) -> tuple[str, str, bytes]:
    """Create a session holding {"a": 1}, then cut its store TTL to `ttl_left` seconds (as if
    it had been idle): (its id, its key, its stored value)."""
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    key = gateway.key(sid)
    raw = await gateway.raw.get(key)
    assert raw is not None
    await gateway.raw.set(key, raw, ttl_left)
    return sid, key, raw


async def stored(gateway: Gateway, session_id: str, app_id: str = "demo") -> dict[str, Any]:
    raw = await gateway.raw.get(gateway.key(session_id, app_id))
    assert raw is not None, "no stored session"
    value: dict[str, Any] = json.loads(raw)
    return value


def session_commands(server: RedisServer) -> dict[str, int]:
    calls = server.command_calls()
    return {c: calls.get(c, 0) for c in SESSION_COMMANDS if calls.get(c, 0)}


def reset_stats(server: RedisServer) -> None:
    with server.client() as client:
        client.config_resetstat()


def assert_envelope(resp: ClientResponse, body: Any, code: str) -> None:
    assert resp.content_type == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["request_id"] == resp.headers["X-Request-Id"]


@pytest.fixture
def two_apps_file(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "apps.toml"
    path.write_text(
        '[apps.demo]\nupstream = "builtin:demo"\n\n[apps.shop]\nupstream = "builtin:demo"\n'
    )
    yield str(path)


# -- reading --------------------------------------------------------------------------------


async def test_get_without_a_session_creates_nothing(gateway: Gateway) -> None:
    resp = await gateway.client.get("/apps/demo/session")
    assert resp.status == 200
    assert await resp.json() == {"data": {}}
    assert resp.headers["Cache-Control"] == "no-store"
    assert set_cookie_headers(resp) == []
    assert await gateway.raw.keys() == []


async def test_health_and_readiness(gateway: Gateway) -> None:
    resp = await gateway.client.get("/healthz")
    assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    resp = await gateway.client.get("/readyz")
    assert resp.status == 200


# -- writing --------------------------------------------------------------------------------


async def test_patch_creates_merges_and_null_removes(gateway: Gateway) -> None:
    resp = await patch(gateway.client, {"a": 1, "obj": {"x": 1}})
    assert resp.status == 200
    assert await resp.json() == {"data": {"a": 1, "obj": {"x": 1}}}
    assert resp.headers["Cache-Control"] == "no-store"
    sid = gateway.session_id()
    assert sid is not None and SID_RE.match(sid)

    resp = await patch(gateway.client, {"b": "two", "obj": {"y": 2}})
    assert await resp.json() == {"data": {"a": 1, "b": "two", "obj": {"y": 2}}}
    assert set_cookie_headers(resp) == []  # same session, same cookie

    resp = await patch(gateway.client, {"a": None, "missing": None})
    assert await resp.json() == {"data": {"b": "two", "obj": {"y": 2}}}

    resp = await gateway.client.get("/apps/demo/session")
    assert await resp.json() == {"data": {"b": "two", "obj": {"y": 2}}}
    assert gateway.session_id() == sid
    assert (await stored(gateway, sid))[DATA] == {"b": "two", "obj": {"y": 2}}
    assert await gateway.raw.keys() == [gateway.key(sid)]


async def test_patch_of_nothing_without_a_session_creates_nothing(gateway: Gateway) -> None:
    for body in ({}, {"a": None}):
        resp = await patch(gateway.client, body)
        assert (resp.status, await resp.json()) == (200, {"data": {}})
        assert set_cookie_headers(resp) == []
    assert await gateway.raw.keys() == []


async def test_unicode_round_trips(gateway: Gateway) -> None:
    await patch(gateway.client, {"name": "Zoë 🦊", "n": 1.5, "list": [1, "x", None, True]})
    resp = await gateway.client.get("/apps/demo/session")
    assert await resp.json() == {"data": {"name": "Zoë 🦊", "n": 1.5, "list": [1, "x", None, True]}}


async def test_gateway_fields_are_never_visible_or_writable(gateway: Gateway) -> None:
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    value = await stored(gateway, sid)
    assert value["v"] == FORMAT_VERSION
    assert isinstance(value[GATEWAY].get("created_at"), int)
    # The gateway's own fields (e.g. a conversation id) live beside the session's mapping
    # (the browser's `data`).
    value[GATEWAY]["conversation_id"] = "conv-secret"
    await gateway.raw.set(gateway.key(sid), json.dumps(value).encode(), 600)

    resp = await gateway.client.get("/apps/demo/session")
    body = await resp.json()
    assert body == {"data": {"a": 1}}
    assert "conv-secret" not in await resp.text()

    # Keys named like the envelope only ever land inside the session's mapping (`data`).
    resp = await patch(gateway.client, {"gw": {"conversation_id": "evil"}, "v": 99, "data": 1})
    assert await resp.json() == {
        "data": {"a": 1, "gw": {"conversation_id": "evil"}, "v": 99, "data": 1}
    }
    value = await stored(gateway, sid)
    assert value["v"] == FORMAT_VERSION
    assert value[GATEWAY]["conversation_id"] == "conv-secret"
    assert value[DATA]["gw"] == {"conversation_id": "evil"}


# -- the key and the TTL --------------------------------------------------------------------


async def test_key_format_and_ttl(gateway_factory: GatewayFactory, kind: str) -> None:
    gateway = await gateway_factory(kind, SESSION_TTL_SECONDS="600")
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None and SID_RE.match(sid)
    assert await gateway.raw.keys() == [f"agent:sess:demo:{sid}"]
    ttl = await gateway.raw.ttl(f"agent:sess:demo:{sid}")
    assert ttl is not None and 590 < ttl <= 600


async def test_custom_prefix(gateway_factory: GatewayFactory, kind: str) -> None:
    gateway = await gateway_factory(kind, REDIS_PREFIX="myapp:sess:")
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert await gateway.raw.keys() == [f"myapp:sess:demo:{sid}"]
    resp = await gateway.client.get("/apps/demo/session")
    assert await resp.json() == {"data": {"a": 1}}


async def test_a_read_slides_the_ttl(gateway_factory: GatewayFactory, kind: str) -> None:
    gateway = await gateway_factory(kind, SESSION_TTL_SECONDS="600")
    _, key, raw = await idle_session(gateway, 5)  # as if the session had been idle for a while
    resp = await gateway.client.get("/apps/demo/session")
    assert await resp.json() == {"data": {"a": 1}}
    ttl = await gateway.raw.ttl(key)
    assert ttl is not None and 590 < ttl <= 600
    assert await gateway.raw.get(key) == raw  # a read writes nothing


async def test_an_unchanged_patch_slides_the_ttl_too(
    gateway_factory: GatewayFactory, kind: str
) -> None:
    gateway = await gateway_factory(kind, SESSION_TTL_SECONDS="600")
    _, key, _ = await idle_session(gateway, 5)
    resp = await patch(gateway.client, {"a": 1})
    assert resp.status == 200
    ttl = await gateway.raw.ttl(key)
    assert ttl is not None and 590 < ttl <= 600


async def test_an_expired_session_is_gone(gateway: Gateway) -> None:
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    await gateway.raw.delete(gateway.key(sid))  # what the TTL does
    resp = await gateway.client.get("/apps/demo/session")
    assert await resp.json() == {"data": {}}
    # Writing again starts a new session under a new id.
    await patch(gateway.client, {"b": 2})
    new_sid = gateway.session_id()
    assert new_sid is not None and new_sid != sid
    assert await gateway.raw.keys() == [gateway.key(new_sid)]


# -- command counts on a real redis-server --------------------------------------------------


async def test_redis_command_counts(redis_gateway: Gateway) -> None:
    server = redis_gateway.redis_server
    assert server is not None
    client = redis_gateway.client

    reset_stats(server)
    await client.get("/apps/demo/session")
    assert session_commands(server) == {}, "a read without a cookie touches nothing"

    reset_stats(server)
    await patch(client, {"a": 1})
    assert session_commands(server) == {"set": 1}, "create: one SET NX EX"

    reset_stats(server)
    resp = await client.get("/apps/demo/session")
    assert await resp.json() == {"data": {"a": 1}}
    assert session_commands(server) == {"getex": 1}, "a read is exactly one GETEX"

    reset_stats(server)
    resp = await patch(client, {"a": 1})
    assert await resp.json() == {"data": {"a": 1}}
    assert session_commands(server) == {"getex": 1}, "an unchanged PATCH writes nothing"

    # The first update after a script cache flush (a restarted or failed-over Redis): EVALSHA
    # answers NOSCRIPT and EVAL runs (and caches) the script: one extra round trip, once.
    with server.client() as direct:
        direct.script_flush()
    reset_stats(server)
    await patch(client, {"b": 2})
    assert session_commands(server) == {"getex": 1, "evalsha": 1, "eval": 1, "get": 1, "set": 1}

    reset_stats(server)
    await patch(client, {"b": None, "missing": None})
    assert session_commands(server) == {"getex": 1, **CAS_UPDATE}, (
        "a change: GETEX + one EVALSHA (compare-and-set: GET, SET XX EX inside Redis)"
    )

    reset_stats(server)
    resp = await client.delete("/apps/demo/session", headers=CSRF)
    assert resp.status == 204
    # Logout: one script that deletes unless a rotation tombstone is there (GET, DEL inside
    # Redis); its first run on this server loads it (EVALSHA answers NOSCRIPT, then EVAL).
    assert session_commands(server) == {"evalsha": 1, "eval": 1, "get": 1, "del": 1}
    await patch(client, {"a": 1})
    reset_stats(server)
    resp = await client.delete("/apps/demo/session", headers=CSRF)
    assert resp.status == 204
    calls = session_commands(server)
    assert calls == {"evalsha": 1, "get": 1, "del": 1}, f"logout is one script call: {calls}"


# -- two applications -----------------------------------------------------------------------


async def test_two_applications_in_one_cookie_jar(
    gateway_factory: GatewayFactory, kind: str, two_apps_file: str
) -> None:
    gateway = await gateway_factory(kind, APPS_FILE=two_apps_file)
    client = gateway.client
    await patch(client, {"app": "demo"}, "demo")
    await patch(client, {"app": "shop"}, "shop")
    demo_sid, shop_sid = gateway.session_id("demo"), gateway.session_id("shop")
    assert demo_sid and shop_sid and demo_sid != shop_sid
    assert sorted(await gateway.raw.keys()) == sorted(
        [gateway.key(demo_sid, "demo"), gateway.key(shop_sid, "shop")]
    )
    assert await (await client.get("/apps/demo/session")).json() == {"data": {"app": "demo"}}
    assert await (await client.get("/apps/shop/session")).json() == {"data": {"app": "shop"}}

    resp = await client.delete("/apps/demo/session", headers=CSRF)
    assert resp.status == 204
    assert await (await client.get("/apps/demo/session")).json() == {"data": {}}
    assert await (await client.get("/apps/shop/session")).json() == {"data": {"app": "shop"}}
    assert await gateway.raw.keys() == [gateway.key(shop_sid, "shop")]
    assert gateway.session_id("shop") == shop_sid


async def test_a_session_id_of_one_application_is_unknown_to_another(
    gateway_factory: GatewayFactory, two_apps_file: str
) -> None:
    gateway = await gateway_factory("memory", APPS_FILE=two_apps_file)
    await patch(gateway.client, {"secret": 1}, "demo")
    sid = gateway.session_id("demo")
    gateway.client.session.cookie_jar.clear()
    resp = await gateway.client.get("/apps/shop/session", headers={"Cookie": f"agent_sid={sid}"})
    assert await resp.json() == {"data": {}}


# -- logout ---------------------------------------------------------------------------------


async def test_delete_removes_the_key_and_expires_the_cookie(gateway: Gateway) -> None:
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    resp = await gateway.client.delete("/apps/demo/session", headers=CSRF)
    assert resp.status == 204
    assert resp.headers["Cache-Control"] == "no-store"
    assert await gateway.raw.keys() == []
    (header,) = set_cookie_headers(resp)
    name, value, attrs = parse_set_cookie(header)
    assert name == "agent_sid" and value == ""
    assert attrs["path"] == "/apps/demo"
    assert attrs.get("max-age") == "0" or "expires" in attrs
    assert gateway.session_id() is None
    assert await (await gateway.client.get("/apps/demo/session")).json() == {"data": {}}


async def test_delete_without_a_session_is_fine(gateway: Gateway) -> None:
    for _ in range(2):
        resp = await gateway.client.delete("/apps/demo/session", headers=CSRF)
        assert resp.status == 204


class LogoutDuringRequest(WrappedBackend):
    """Wraps a backend: right after a load, the session is deleted (a logout elsewhere)."""

    def __init__(self, inner: SessionBackend) -> None:
        super().__init__(inner)
        self.armed = False

    async def get_and_touch(self, key: str, ttl: int) -> bytes | None:
        value = await self.inner.get_and_touch(key, ttl)
        if self.armed:
            await self.inner.delete(key)
        return value


async def test_a_write_racing_a_logout_does_not_resurrect(gateway: Gateway) -> None:
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    storage = gateway.app[STORAGE_APP_KEY]
    racing = LogoutDuringRequest(storage.backend)
    storage.backend = racing
    racing.armed = True
    resp = await patch(gateway.client, {"a": 2})
    assert resp.status == 409
    assert_envelope(resp, await resp.json(), "session_ended")
    assert await gateway.raw.keys() == [], "the logged-out session came back"
    (header,) = set_cookie_headers(resp)
    _, value, attrs = parse_set_cookie(header)
    assert value == "" and attrs["path"] == "/apps/demo"


# -- corrupt values -------------------------------------------------------------------------


CORRUPT_VALUES = {
    "bad-json": b"{not json",
    "not-an-object": b"[1, 2, 3]",
    "a-string": b'"hello"',
    "bad-utf8": b'{"v": 1, "data": {"a": "\xff\xfe"}, "gw": {}}',
    "unknown-version": b'{"v": 99, "data": {"a": 1}, "gw": {}}',
    "no-version": b'{"data": {"a": 1}, "gw": {}}',
    "data-not-object": b'{"v": 1, "data": [1], "gw": {}}',
    "gw-not-object": b'{"v": 1, "data": {}, "gw": "x"}',
    "empty": b"",
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("corrupt", CORRUPT_VALUES)
async def test_a_corrupt_value_is_no_session_and_removed(
    gateway_factory: GatewayFactory, kind: str, corrupt: str
) -> None:
    gateway = await gateway_factory(kind)
    key = gateway.key(UNKNOWN_SID)
    await gateway.raw.set(key, CORRUPT_VALUES[corrupt], 600)
    cookie = {"Cookie": f"agent_sid={UNKNOWN_SID}"}
    resp = await gateway.client.get("/apps/demo/session", headers=cookie)
    assert resp.status == 200
    assert await resp.json() == {"data": {}}
    assert await gateway.raw.get(key) is None

    # A write with that cookie starts a fresh session (a new id), never a 500.
    await gateway.raw.set(key, CORRUPT_VALUES[corrupt], 600)
    resp = await gateway.client.patch(
        "/apps/demo/session", json={"a": 1}, headers={**CSRF, **cookie}
    )
    assert resp.status == 200
    assert await resp.json() == {"data": {"a": 1}}
    new_sid = gateway.session_id()
    assert new_sid is not None and new_sid != UNKNOWN_SID
    assert await gateway.raw.keys() == [gateway.key(new_sid)]


# -- size limit -----------------------------------------------------------------------------


async def test_size_limit_413_keeps_the_old_value(
    gateway_factory: GatewayFactory, kind: str
) -> None:
    gateway = await gateway_factory(kind, SESSION_MAX_BYTES="300")
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    before = await gateway.raw.get(gateway.key(sid))
    # The body is within the read cap (2x the limit) but the session would not be.
    resp = await patch(gateway.client, {"big": "x" * 400})
    assert resp.status == 413
    assert_envelope(resp, await resp.json(), "session_too_large")
    assert await gateway.raw.get(gateway.key(sid)) == before
    assert await (await gateway.client.get("/apps/demo/session")).json() == {"data": {"a": 1}}
    # A body far over the limit is refused before it is even parsed.
    resp = await patch(gateway.client, {"big": "x" * 5000})
    assert resp.status == 413
    assert await gateway.raw.get(gateway.key(sid)) == before


async def test_a_new_session_over_the_limit_is_not_created(
    gateway_factory: GatewayFactory, kind: str
) -> None:
    gateway = await gateway_factory(kind, SESSION_MAX_BYTES="300")
    resp = await patch(gateway.client, {"big": "x" * 400})
    assert resp.status == 413
    assert set_cookie_headers(resp) == []
    assert await gateway.raw.keys() == []


async def test_a_session_exactly_at_the_limit_is_accepted(memory_gateway: Gateway) -> None:
    limit = memory_gateway.settings.session_max_bytes
    await patch(memory_gateway.client, {"a": ""})
    sid = memory_gateway.session_id()
    assert sid is not None
    size = len(await memory_gateway.raw.get(memory_gateway.key(sid)) or b"")
    resp = await patch(memory_gateway.client, {"a": "x" * (limit - size)})
    assert resp.status == 200
    assert len(await memory_gateway.raw.get(memory_gateway.key(sid)) or b"") == limit
    resp = await patch(memory_gateway.client, {"a": "x" * (limit - size + 1)})
    assert resp.status == 413


# -- CSRF and bodies ------------------------------------------------------------------------


@pytest.mark.parametrize("csrf", [None, "0", "true", ""])
async def test_csrf_header_is_required(gateway: Gateway, csrf: str | None) -> None:
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    before = await gateway.raw.get(gateway.key(sid))
    headers = {} if csrf is None else {"X-CSRF": csrf}
    for method in ("PATCH", "DELETE"):
        resp = await gateway.client.request(
            method, "/apps/demo/session", json={"a": 2}, headers=headers
        )
        assert resp.status == 403, method
        assert_envelope(resp, await resp.json(), "csrf_header_missing")
        assert set_cookie_headers(resp) == []
    assert await gateway.raw.get(gateway.key(sid)) == before


async def test_csrf_refusal_reaches_no_store(redis_gateway: Gateway) -> None:
    server = redis_gateway.redis_server
    assert server is not None
    await patch(redis_gateway.client, {"a": 1})
    reset_stats(server)
    resp = await redis_gateway.client.patch("/apps/demo/session", json={"a": 2})
    assert resp.status == 403
    resp = await redis_gateway.client.delete("/apps/demo/session")
    assert resp.status == 403
    assert session_commands(server) == {}


@pytest.mark.parametrize(
    "body",
    [
        b"[1, 2]",
        b'"text"',
        b"42",
        b"null",
        b"true",
        b"{",
        b"",
        b"\xff\xfe{}",
        b"{'a': 1}",
        # A lone surrogate parses in Python but has no UTF-8 form (it used to be a 500).
        b'{"a":"\\ud800"}',
        b'{"\\udfff":1}',
        # Not JSON, though Python's json accepts them (they used to be stored and echoed).
        b'{"a":NaN}',
        b'{"a":[Infinity]}',
        b'{"a":{"b":-Infinity}}',
        # Numbers a float cannot hold: Python's json makes them inf (stored, then echoed as
        # `Infinity`, which is not JSON).
        b'{"a":1e400}',
        b'{"a":[-1.5e309]}',
        # Deeper than the 64-level limit; 974 levels used to be a 500 (RecursionError).
        b'{"a":' + b"[" * 64 + b"]" * 64 + b"}",
        b'{"a":' + b"[" * 974 + b"]" * 974 + b"}",
    ],
)
async def test_a_body_that_is_not_a_json_object_is_400(gateway: Gateway, body: bytes) -> None:
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    before = await gateway.raw.get(gateway.key(sid))
    resp = await gateway.client.patch(
        "/apps/demo/session",
        data=body,
        headers={**CSRF, "Content-Type": "application/json"},
    )
    assert resp.status == 400
    assert_envelope(resp, await resp.json(), "invalid_json")
    assert await gateway.raw.get(gateway.key(sid)) == before
    assert await gateway.raw.keys() == [gateway.key(sid)]


async def test_json_nested_64_levels_is_accepted(memory_gateway: Gateway) -> None:
    nested: object = 1
    for _ in range(63):
        nested = [nested]
    resp = await memory_gateway.client.patch("/apps/demo/session", json={"a": nested}, headers=CSRF)
    assert resp.status == 200
    assert (await resp.json())["data"] == {"a": nested}


# -- application ids ------------------------------------------------------------------------


async def assert_refused_on_every_method(
    gateway: Gateway, app_id: str, status: int, code: str
) -> None:
    """GET, PATCH and DELETE on `app_id`'s session answer `status` with error `code`, and
    nothing is stored."""
    for method in ("GET", "PATCH", "DELETE"):
        resp = await gateway.client.request(
            method, f"/apps/{app_id}/session", json={"a": 1}, headers=CSRF
        )
        assert resp.status == status, (method, app_id)
        assert_envelope(resp, await resp.json(), code)
    assert await gateway.raw.keys() == []


@pytest.mark.parametrize(
    "app_id",
    ["Demo", "-demo", "_demo", "a" * 64, "de.mo", "de%20mo", "d%C3%A9mo", "demo!", "demo%0A"],
)
async def test_a_malformed_application_id_is_400(gateway: Gateway, app_id: str) -> None:
    await assert_refused_on_every_method(gateway, app_id, 400, "invalid_application_id")


@pytest.mark.parametrize("app_id", ["shop", "a" * 63, "x_y-z", "0"])
async def test_an_unknown_application_is_404(gateway: Gateway, app_id: str) -> None:
    await assert_refused_on_every_method(gateway, app_id, 404, "unknown_application")


async def test_bad_application_ids_never_reach_the_store(redis_gateway: Gateway) -> None:
    server = redis_gateway.redis_server
    assert server is not None
    cookie = {"Cookie": f"agent_sid={UNKNOWN_SID}", **CSRF}
    reset_stats(server)
    for app_id in ("Bad!", "unknown"):
        for method in ("GET", "PATCH", "DELETE"):
            resp = await redis_gateway.client.request(
                method, f"/apps/{app_id}/session", json={"a": 1}, headers=cookie
            )
            assert resp.status in (400, 404)
    assert session_commands(server) == {}


# -- junk cookies ---------------------------------------------------------------------------


JUNK_COOKIES = {
    "malformed": "agent_sid=not-a-session-id",
    "too-short": "agent_sid=" + "A" * 42,
    "too-long": "agent_sid=" + "A" * 44,
    "oversized": "agent_sid=" + "A" * 4000,
    "bad-characters": 'agent_sid="' + "A" * 41 + '+/"',
    "empty": "agent_sid=",
    "unknown-id": f"agent_sid={UNKNOWN_SID}",
    "duplicate": f"agent_sid=junk; agent_sid={UNKNOWN_SID}",
    "garbage-header": '=;;; agent_sid;=x; ,, "\\',
}


@pytest.mark.parametrize("junk", JUNK_COOKIES)
async def test_junk_cookies_mean_no_session(gateway: Gateway, junk: str) -> None:
    headers = {"Cookie": JUNK_COOKIES[junk]}
    resp = await gateway.client.get("/apps/demo/session", headers=headers)
    assert resp.status == 200
    assert await resp.json() == {"data": {}}
    assert set_cookie_headers(resp) == []
    resp = await gateway.client.delete("/apps/demo/session", headers={**headers, **CSRF})
    assert resp.status == 204
    # A write gets a fresh, gateway-made id: a client-chosen id is never adopted.
    resp = await gateway.client.patch(
        "/apps/demo/session", json={"a": 1}, headers={**headers, **CSRF}
    )
    assert resp.status == 200
    sid = gateway.session_id()
    assert sid is not None and sid != UNKNOWN_SID and SID_RE.match(sid)
    assert await gateway.raw.keys() == [gateway.key(sid)]


async def test_malformed_cookies_never_reach_the_store(redis_gateway: Gateway) -> None:
    server = redis_gateway.redis_server
    assert server is not None
    reset_stats(server)
    for junk in ("malformed", "too-short", "too-long", "oversized", "bad-characters", "empty"):
        resp = await redis_gateway.client.get(
            "/apps/demo/session", headers={"Cookie": JUNK_COOKIES[junk]}
        )
        assert resp.status == 200
    assert session_commands(server) == {}


# -- the cookie -----------------------------------------------------------------------------


async def new_session_cookie(
    gateway_factory: GatewayFactory, env: dict[str, str], **headers: str
) -> tuple[str, dict[str, str | bool], str]:
    gateway = await gateway_factory("memory", env)
    resp = await patch(gateway.client, {"a": 1}, **headers)
    assert resp.status == 200
    (header,) = set_cookie_headers(resp)
    name, value, attrs = parse_set_cookie(header)
    assert name == gateway.settings.cookie_name
    return value, attrs, header


async def test_cookie_attributes_by_default(gateway_factory: GatewayFactory) -> None:
    value, attrs, header = await new_session_cookie(gateway_factory, {})
    assert SID_RE.match(value)
    assert attrs["httponly"] is True
    assert attrs["path"] == "/apps/demo"
    assert attrs["samesite"] == "Lax"
    assert "secure" not in attrs  # plain HTTP (auto) keeps working locally
    for absent in ("max-age", "expires", "domain"):
        assert absent not in attrs, header


async def test_cookie_name_and_samesite_settings(gateway_factory: GatewayFactory) -> None:
    value, attrs, _ = await new_session_cookie(
        gateway_factory,
        {"SESSION_COOKIE_NAME": "my_sid", "SESSION_COOKIE_SAMESITE": "Strict"},
    )
    assert SID_RE.match(value)
    assert attrs["samesite"] == "Strict"
    _, attrs, _ = await new_session_cookie(
        gateway_factory, {"SESSION_COOKIE_SAMESITE": "None", "SESSION_COOKIE_SECURE": "true"}
    )
    assert attrs["samesite"] == "None"
    assert attrs["secure"] is True


async def test_secure_true_always_sets_secure(gateway_factory: GatewayFactory) -> None:
    _, attrs, _ = await new_session_cookie(gateway_factory, {"SESSION_COOKIE_SECURE": "true"})
    assert attrs["secure"] is True


async def test_secure_false_never_sets_secure(gateway_factory: GatewayFactory) -> None:
    _, attrs, _ = await new_session_cookie(
        gateway_factory,
        {"SESSION_COOKIE_SECURE": "false", "TRUSTED_PROXIES": "127.0.0.1/32"},
        **{"X-Forwarded-Proto": "https"},
    )
    assert "secure" not in attrs


async def test_secure_auto_believes_a_trusted_proxy(gateway_factory: GatewayFactory) -> None:
    _, attrs, _ = await new_session_cookie(
        gateway_factory,
        {"SESSION_COOKIE_SECURE": "auto", "TRUSTED_PROXIES": "127.0.0.1/32"},
        **{"X-Forwarded-Proto": "https"},
    )
    assert attrs["secure"] is True


@pytest.mark.parametrize("trusted", ["", "10.0.0.0/8"])
async def test_secure_auto_ignores_an_untrusted_peer(
    gateway_factory: GatewayFactory, trusted: str
) -> None:
    _, attrs, _ = await new_session_cookie(
        gateway_factory,
        {"SESSION_COOKIE_SECURE": "auto", "TRUSTED_PROXIES": trusted},
        **{"X-Forwarded-Proto": "https"},
    )
    assert "secure" not in attrs


async def test_logout_cookie_matches_the_session_cookie(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(
        "memory", SESSION_COOKIE_SECURE="true", SESSION_COOKIE_SAMESITE="Strict"
    )
    await patch(gateway.client, {"a": 1})
    resp = await gateway.client.delete("/apps/demo/session", headers=CSRF)
    (header,) = set_cookie_headers(resp)
    _, value, attrs = parse_set_cookie(header)
    assert value == ""
    assert attrs["path"] == "/apps/demo"
    assert attrs["secure"] is True and attrs["httponly"] is True
    assert attrs["samesite"] == "Strict"


async def test_session_ids_are_unique(memory_gateway: Gateway) -> None:
    ids = set()
    for _ in range(50):
        memory_gateway.client.session.cookie_jar.clear()
        await patch(memory_gateway.client, {"a": 1})
        sid = memory_gateway.session_id()
        assert sid is not None
        ids.add(sid)
    assert len(ids) == 50


# -- streaming responses save the session too ----------------------------------------------


async def test_a_streaming_response_saves_the_session_and_sets_the_cookie(
    aiohttp_client: AiohttpClient,
) -> None:
    settings = make_settings()
    app = create_app(settings)

    async def stream(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        session["streamed"] = True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await commit_session(request, response)  # before prepare(): the cookie can still go
        await response.prepare(request)
        await response.write(b"data: hello\n\n")
        await response.write_eof()
        return response

    app.router.add_get("/apps/{applicationId}/test-stream", stream)
    client = await aiohttp_client(app)
    resp = await client.get("/apps/demo/test-stream")
    assert resp.status == 200
    assert await resp.text() == "data: hello\n\n"
    (header,) = set_cookie_headers(resp)
    _, value, attrs = parse_set_cookie(header)
    assert SID_RE.match(value) and attrs["path"] == "/apps/demo"
    resp = await client.get("/apps/demo/session")
    assert await resp.json() == {"data": {"streamed": True}}


# -- bodies that arrive in pieces ----------------------------------------------------------


async def test_a_body_arriving_in_pieces_is_read_whole(gateway: Gateway) -> None:
    """A chunked or slow body is read to its end, not just its first chunk."""
    body = json.dumps({"text": "y" * 3000, "n": 1}).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]
            await asyncio.sleep(0.02)  # let each piece arrive on its own

    resp = await gateway.client.patch(
        "/apps/demo/session",
        data=pieces(),
        headers={**CSRF, "Content-Type": "application/json"},
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["data"]["n"] == 1


async def test_a_chunked_body_over_the_cap_is_413(memory_gateway: Gateway) -> None:
    cap = memory_gateway.settings.session_max_bytes * 2

    async def pieces() -> AsyncIterator[bytes]:
        yield b'{"a": "'
        for _ in range(cap // 1000 + 2):
            yield b"z" * 1000
            await asyncio.sleep(0)
        yield b'"}'

    resp = await memory_gateway.client.patch(
        "/apps/demo/session",
        data=pieces(),
        headers={**CSRF, "Content-Type": "application/json"},
    )
    assert resp.status == 413
    assert await memory_gateway.raw.keys() == []


async def test_a_stalled_body_is_408_and_changes_nothing(gateway_factory: GatewayFactory) -> None:
    """A PATCH whose body stops arriving must not hold its handler (and a shutdown) forever."""
    gateway = await gateway_factory("memory", BODY_TIMEOUT_SECONDS="0.3")
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    before = await gateway.raw.get(gateway.key(sid))
    server = gateway.client.server
    head, body = await send_and_read_head(  # 10 s: generous, the deadline is 0.3 s
        server.host,
        server.port,
        b"PATCH /apps/demo/session HTTP/1.1\r\n"
        + f"Host: {server.host}:{server.port}\r\n".encode()
        + f"Cookie: agent_sid={sid}\r\n".encode()
        + b"X-CSRF: 1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        + b'{"a":',  # and nothing more
    )
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert json.loads(body)["error"]["code"] == "body_timeout"
    assert await gateway.raw.get(gateway.key(sid)) == before


async def test_a_stalled_patch_body_gets_408_and_the_connection_closes_at_once(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = await gateway_factory("memory", BODY_TIMEOUT_SECONDS="0.3")
    server = gateway.client.server
    raw, seconds_to_close = await stall_and_time_close(
        server.host,
        server.port,
        b"PATCH /apps/demo/session HTTP/1.1\r\n"
        + f"Host: {server.host}:{server.port}\r\n".encode()
        + b"X-CSRF: 1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        + b'{"a":',  # and nothing more
    )
    assert raw.startswith(b"HTTP/1.1 408 "), raw
    assert b"\r\nConnection: close" in raw, raw
    assert seconds_to_close < 1.0, seconds_to_close


# -- start-up notices ------------------------------------------------------------------------


async def test_memory_store_warns_that_it_is_per_process(
    gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        await gateway_factory("memory")
    text = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "SESSION_STORE=memory" in text
    assert "restart" in text and "replica" in text


async def test_memory_store_stays_bounded_under_a_flood(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory("memory", MEMORY_MAX_SESSIONS="5")
    sids = []
    for i in range(12):
        gateway.client.session.cookie_jar.clear()
        resp = await patch(gateway.client, {"i": i})
        assert resp.status == 200
        sids.append(gateway.session_id())
    keys = await gateway.raw.keys()
    assert len(keys) == 5
    # The least recently used went first; the newest are still there.
    assert sorted(keys) == sorted(gateway.key(sid) for sid in sids[-5:] if sid)
