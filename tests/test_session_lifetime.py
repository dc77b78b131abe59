"""Absolute lifetime (`SESSION_ABSOLUTE_SECONDS`) and the non-sliding status read
(`GET /apps/{id}/session?slide=0`), through HTTP on the memory store, fakeredis and a real
redis-server.

Time is moved by replacing the storage's wall clock (what `created_at` and the absolute
deadline are measured with); the store's own TTLs are checked as they are.
"""

from __future__ import annotations

import json
import time

import pytest

from app.keys import STORAGE_APP_KEY
from app.sessions.codec import CREATED_AT, GATEWAY
from app.sessions.storage import SessionStorage
from tests.conftest import Gateway, GatewayFactory, make_settings
from tests.test_sessions_http import (
    UNKNOWN_SID,
    idle_session,
    patch,
    reset_stats,
    session_commands,
    set_cookie_headers,
    stored,
)


def storage(gateway: Gateway) -> SessionStorage:
    return gateway.app[STORAGE_APP_KEY]


class Clock:
    """A wall clock the test moves."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def frozen_clock(gateway: Gateway) -> Clock:
    clock = Clock(time.time())
    storage(gateway).clock = clock
    return clock


async def new_session_on_frozen_clock(gateway: Gateway) -> tuple[Clock, str, float]:
    """Freeze the storage's clock, then create a session holding {"a": 1}: (the clock, the
    session id, its stored created_at)."""
    clock = frozen_clock(gateway)
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    created: float = (await stored(gateway, sid))[GATEWAY][CREATED_AT]
    return clock, sid, created


async def store_ttl(gateway: Gateway, sid: str) -> float:
    ttl = await gateway.raw.ttl(gateway.key(sid))
    assert ttl is not None, "the key is gone"
    return ttl


# -- absolute lifetime ----------------------------------------------------------------------


def test_the_absolute_lifetime_is_off_by_default() -> None:
    assert make_settings().session_absolute_seconds == 0


async def test_without_an_absolute_lifetime_an_active_session_lives_on(
    gateway_factory: GatewayFactory, kind: str
) -> None:
    """The spec: active sessions remain valid as long as they are being used."""
    gateway = await gateway_factory(kind, SESSION_TTL_SECONDS="600")
    clock, sid, created = await new_session_on_frozen_clock(gateway)
    clock.now = created + 10 * 365 * 86400  # ten years of activity later
    resp = await gateway.client.get("/apps/demo/session")
    assert await resp.json() == {"data": {"a": 1}}
    assert 590 < await store_ttl(gateway, sid) <= 600
    assert (await patch(gateway.client, {"b": 2})).status == 200
    assert gateway.session_id() == sid
    assert 590 < await store_ttl(gateway, sid) <= 600
    body = await (await gateway.client.get("/apps/demo/session?slide=0")).json()
    assert body["data"] == {"a": 1, "b": 2}
    assert 590 < body["idle_expires_in"] <= 600
    assert body["absolute_expires_in"] is None
    rotated = await gateway.client.post("/apps/demo/session/rotate", headers={"X-CSRF": "1"})
    assert (await rotated.json())["rotated"] is True


async def test_an_active_session_ends_at_its_absolute_deadline(
    gateway_factory: GatewayFactory, kind: str
) -> None:
    gateway = await gateway_factory(
        kind, SESSION_TTL_SECONDS="600", SESSION_ABSOLUTE_SECONDS="1000"
    )
    clock, sid, created = await new_session_on_frozen_clock(gateway)
    # Used again after 500 s (inside the idle TTL) and 999 s: alive until 1000 s.
    for offset in (500, 999):
        clock.now = created + offset
        resp = await gateway.client.get("/apps/demo/session")
        assert (await resp.json())["data"]["a"] == 1
        assert (await patch(gateway.client, {"at": offset})).status == 200
    assert (await stored(gateway, sid))[GATEWAY][CREATED_AT] == created, "a write reset it"

    clock.now = created + 1000
    resp = await gateway.client.get("/apps/demo/session")
    assert resp.status == 200
    assert await resp.json() == {"data": {}}
    assert await gateway.raw.get(gateway.key(sid)) is None, "the expired session was kept"

    # The next write starts a new session, with a new id and a new deadline.
    resp = await patch(gateway.client, {"b": 2})
    assert await resp.json() == {"data": {"b": 2}}
    new_sid = gateway.session_id()
    assert new_sid is not None and new_sid != sid
    assert (await stored(gateway, new_sid))[GATEWAY][CREATED_AT] == created + 1000


async def test_the_store_ttl_never_outlives_the_absolute_deadline(
    gateway_factory: GatewayFactory, kind: str
) -> None:
    gateway = await gateway_factory(
        kind, SESSION_TTL_SECONDS="600", SESSION_ABSOLUTE_SECONDS="1000"
    )
    clock, sid, created = await new_session_on_frozen_clock(gateway)
    assert 590 < await store_ttl(gateway, sid) <= 600  # far from the deadline: the idle TTL

    clock.now = created + 900  # 100 s left
    resp = await gateway.client.get("/apps/demo/session")  # a read slides...
    assert await resp.json() == {"data": {"a": 1}}
    assert 90 < await store_ttl(gateway, sid) <= 100  # ...but only up to the deadline

    clock.now = created + 950  # 50 s left
    assert (await patch(gateway.client, {"a": 2})).status == 200  # a write too
    assert 40 < await store_ttl(gateway, sid) <= 50


async def test_new_sessions_get_the_absolute_lifetime_when_it_is_shorter(
    gateway_factory: GatewayFactory, kind: str
) -> None:
    gateway = await gateway_factory(kind, SESSION_TTL_SECONDS="3600", SESSION_ABSOLUTE_SECONDS="60")
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    assert 55 < await store_ttl(gateway, sid) <= 60


@pytest.mark.integration
async def test_near_the_deadline_a_read_costs_one_extra_expire(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = await gateway_factory("redis", SESSION_ABSOLUTE_SECONDS="43200")
    server = gateway.redis_server
    assert server is not None
    settings_ttl = gateway.settings.session_ttl_seconds
    clock, _, created = await new_session_on_frozen_clock(gateway)

    reset_stats(server)
    await gateway.client.get("/apps/demo/session")
    assert session_commands(server) == {"getex": 1}, "far from the deadline: one GETEX"

    clock.now = created + gateway.settings.session_absolute_seconds - settings_ttl / 2
    reset_stats(server)
    resp = await gateway.client.get("/apps/demo/session")
    assert await resp.json() == {"data": {"a": 1}}
    assert session_commands(server) == {"getex": 1, "expire": 1}

    clock.now = created + gateway.settings.session_absolute_seconds
    reset_stats(server)
    resp = await gateway.client.get("/apps/demo/session")
    assert await resp.json() == {"data": {}}
    calls = session_commands(server)
    assert calls in ({"getex": 1, "del": 1}, {"getex": 1, "unlink": 1}), calls


async def test_a_value_without_created_at_is_no_session(gateway: Gateway) -> None:
    """The gateway always writes created_at; a value without it was not written by us."""
    key = gateway.key(UNKNOWN_SID)
    await gateway.raw.set(key, b'{"v":1,"r":3,"data":{"a":1},"gw":{}}', 600)
    resp = await gateway.client.get(
        "/apps/demo/session", headers={"Cookie": f"agent_sid={UNKNOWN_SID}"}
    )
    assert await resp.json() == {"data": {}}
    assert await gateway.raw.get(key) is None


# -- the status read (?slide=0) ---------------------------------------------------------------


async def test_status_read_answers_lifetimes_without_sliding(
    gateway_factory: GatewayFactory, kind: str
) -> None:
    gateway = await gateway_factory(
        kind, SESSION_TTL_SECONDS="600", SESSION_ABSOLUTE_SECONDS="5000"
    )
    sid, key, raw = await idle_session(gateway, 50)  # as if idle for 550 s

    resp = await gateway.client.get("/apps/demo/session?slide=0")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    assert set(body) == {"data", "idle_expires_in", "absolute_expires_in"}
    assert body["data"] == {"a": 1}
    assert 45 <= body["idle_expires_in"] <= 50
    assert 4990 <= body["absolute_expires_in"] <= 5000
    ttl = await store_ttl(gateway, sid)
    assert ttl <= 50, "the status read slid the TTL"
    assert await gateway.raw.get(key) == raw, "the status read wrote"
    assert set_cookie_headers(resp) == []

    # An ordinary read still slides.
    await gateway.client.get("/apps/demo/session")
    assert 590 < await store_ttl(gateway, sid) <= 600


async def test_status_read_reports_the_absolute_deadline_as_the_idle_bound(
    gateway_factory: GatewayFactory, kind: str
) -> None:
    gateway = await gateway_factory(
        kind, SESSION_TTL_SECONDS="600", SESSION_ABSOLUTE_SECONDS="1000"
    )
    clock, sid, created = await new_session_on_frozen_clock(gateway)
    clock.now = created + 970
    body = await (await gateway.client.get("/apps/demo/session?slide=0")).json()
    assert body["absolute_expires_in"] == 30
    assert body["idle_expires_in"] <= 30

    clock.now = created + 1000
    body = await (await gateway.client.get("/apps/demo/session?slide=0")).json()
    assert body == {"data": {}, "idle_expires_in": None, "absolute_expires_in": None}
    assert await gateway.raw.get(gateway.key(sid)) is None


async def test_status_read_without_a_session(gateway: Gateway) -> None:
    for headers in ({}, {"Cookie": f"agent_sid={UNKNOWN_SID}"}, {"Cookie": "agent_sid=junk"}):
        resp = await gateway.client.get("/apps/demo/session?slide=0", headers=headers)
        assert resp.status == 200
        assert await resp.json() == {
            "data": {},
            "idle_expires_in": None,
            "absolute_expires_in": None,
        }
        assert resp.headers["Cache-Control"] == "no-store"
        assert set_cookie_headers(resp) == []
    assert await gateway.raw.keys() == []


@pytest.mark.parametrize("value", ["2", "", "yes", "false", "0 "])
async def test_status_read_refuses_other_slide_values(memory_gateway: Gateway, value: str) -> None:
    resp = await memory_gateway.client.get("/apps/demo/session", params={"slide": value})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_parameter"


async def test_status_read_is_one_round_trip(redis_gateway: Gateway) -> None:
    server = redis_gateway.redis_server
    assert server is not None
    await patch(redis_gateway.client, {"a": 1})
    reset_stats(server)
    resp = await redis_gateway.client.get("/apps/demo/session?slide=0")
    assert (await resp.json())["data"] == {"a": 1}
    # One pipelined round trip: GET and PTTL, nothing that slides or writes.
    assert session_commands(server) == {"get": 1, "pttl": 1}

    reset_stats(server)
    await redis_gateway.client.get("/apps/demo/session?slide=1")
    assert session_commands(server) == {"getex": 1}


async def test_status_read_of_a_corrupt_value_removes_it(gateway: Gateway) -> None:
    key = gateway.key(UNKNOWN_SID)
    await gateway.raw.set(key, json.dumps({"v": 1, "data": []}).encode(), 600)
    resp = await gateway.client.get(
        "/apps/demo/session?slide=0", headers={"Cookie": f"agent_sid={UNKNOWN_SID}"}
    )
    assert (await resp.json())["data"] == {}
    assert await gateway.raw.get(key) is None


async def test_status_read_needs_no_csrf_and_changes_nothing(gateway: Gateway) -> None:
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    before = await gateway.raw.get(gateway.key(sid))
    resp = await gateway.client.get("/apps/demo/session?slide=0", headers={"X-CSRF": "0"})
    assert resp.status == 200
    assert await gateway.raw.get(gateway.key(sid)) == before
