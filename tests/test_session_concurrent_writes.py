"""No lost updates: concurrent writes to one session are compare-and-set on its revision; the
loser re-reads and re-applies its change (bounded), so concurrent PATCHes of different keys
all survive, on two real gateway processes sharing a real Redis, and in-process on every store.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.fernet import Fernet
from pytest_aiohttp import AiohttpServer

from app.keys import STORAGE_APP_KEY
from app.proxy.headers import THREAD_HEADER
from app.sessions.backend import CasResult, SessionBackend
from app.sessions.middleware import CAS_ATTEMPTS
from tests.backends import WrappedBackend
from tests.conftest import CSRF, Gateway, GatewayFactory, GatewayProcessFactory
from tests.fake_upstream import ServedUpstream, serve_upstream
from tests.redis_server import RedisServer
from tests.redis_topologies import GatewayHttp
from tests.test_metrics import scrape, value
from tests.test_sessions_http import assert_envelope, patch, stored

KEY = Fernet.generate_key().decode()


class SlowReads(WrappedBackend):
    """Wraps a backend: every read takes `delay` seconds (a busy store, a long request), so
    concurrent requests really interleave between their read and their write."""

    def __init__(self, inner: SessionBackend, delay: float = 0.05) -> None:
        super().__init__(inner)
        self.delay = delay
        self.results: list[CasResult] = []
        self.always_conflict = False

    async def get_and_touch(self, key: str, ttl: int) -> bytes | None:
        value = await self.inner.get_and_touch(key, ttl)
        await asyncio.sleep(self.delay)
        return value

    async def compare_and_set(self, key: str, expected: str, value: bytes, ttl: int) -> CasResult:
        result: CasResult = "conflict"
        if not self.always_conflict:
            result = await self.inner.compare_and_set(key, expected, value, ttl)
        self.results.append(result)
        return result


def slow(gateway: Gateway) -> SlowReads:
    storage = gateway.app[STORAGE_APP_KEY]
    wrapper = SlowReads(storage.backend)
    storage.backend = wrapper
    return wrapper


# -- two gateway processes, one Redis --------------------------------------------------------


async def test_concurrent_patches_on_two_replicas_all_survive(
    shared_redis: RedisServer, gateway_process: GatewayProcessFactory
) -> None:
    env = {"SESSION_STORE": "redis", "REDIS_URL": shared_redis.url}
    one, two = gateway_process(env), gateway_process(env)
    async with GatewayHttp(one.url) as a, GatewayHttp(two.url) as b:
        created = await a.patch({"start": True})
        assert created.status == 200 and created.sid is not None
        sid = created.sid
        # Pairs of concurrent PATCHes, one through each replica, each adding its own key.
        for round_ in range(25):
            first, second = await asyncio.gather(
                a.patch({f"a{round_}": round_}, sid=sid), b.patch({f"b{round_}": round_}, sid=sid)
            )
            assert (first.status, second.status) == (200, 200), (first, second)
        final = await b.get(sid)
        expected = (
            {"start": True} | {f"a{i}": i for i in range(25)} | {f"b{i}": i for i in range(25)}
        )
        assert final.body == {"data": expected}, "an update was lost"

        # Heavier contention: every acknowledged update is there; a refused one says so.
        replies = await asyncio.gather(
            *((a if i % 2 else b).patch({f"c{i}": i}, sid=sid) for i in range(16))
        )
        data = (await a.get(sid)).body["data"]
        for i, reply in enumerate(replies):
            if reply.status == 200:
                assert data.get(f"c{i}") == i, f"acknowledged update c{i} was lost"
            else:
                assert (reply.status, reply.error_code) == (409, "session_conflict"), reply
                assert reply.headers.get("Retry-After") == "1"
        assert sum(r.status == 200 for r in replies) >= 2


# -- in process, every store -----------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [False, True])
async def test_concurrent_patches_of_different_keys_both_survive(
    gateway_factory: GatewayFactory, kind: str, encrypted: bool
) -> None:
    env = {"SESSION_ENCRYPTION_KEYS": KEY} if encrypted else {}
    gateway = await gateway_factory(kind, env)
    await patch(gateway.client, {"start": 0})
    sid = gateway.session_id()
    assert sid is not None
    wrapper = slow(gateway)
    first, second = await asyncio.gather(
        patch(gateway.client, {"x": 1}), patch(gateway.client, {"y": 2})
    )
    assert (first.status, second.status) == (200, 200)
    assert "conflict" in wrapper.results, "the two requests did not race"
    # Each response shows the data as it saved it; the store has both.
    bodies = [await first.json(), await second.json()]
    assert {"start": 0, "x": 1, "y": 2} in [b["data"] for b in bodies]
    resp = await gateway.client.get("/apps/demo/session")
    assert await resp.json() == {"data": {"start": 0, "x": 1, "y": 2}}
    assert gateway.session_id() == sid


async def test_a_patch_and_a_delete_of_the_same_key(
    gateway_factory: GatewayFactory, kind: str
) -> None:
    """Re-applied patches keep their meaning: `null` removes, values overwrite."""
    gateway = await gateway_factory(kind)
    await patch(gateway.client, {"a": 1, "b": 1})
    slow(gateway)
    results = await asyncio.gather(
        patch(gateway.client, {"a": None}), patch(gateway.client, {"b": 2, "c": 3})
    )
    assert [r.status for r in results] == [200, 200]
    resp = await gateway.client.get("/apps/demo/session")
    assert await resp.json() == {"data": {"b": 2, "c": 3}}


async def test_retries_are_bounded(gateway_factory: GatewayFactory, kind: str) -> None:
    gateway = await gateway_factory(kind)
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    before = await gateway.raw.get(gateway.key(sid))
    wrapper = slow(gateway)
    wrapper.delay = 0
    wrapper.always_conflict = True
    resp = await patch(gateway.client, {"a": 2})
    assert resp.status == 409
    assert_envelope(resp, await resp.json(), "session_conflict")
    assert resp.headers["Retry-After"] == "1"
    assert "Set-Cookie" not in resp.headers  # the session is fine: the browser keeps it
    assert wrapper.results == ["conflict"] * CAS_ATTEMPTS
    assert await gateway.raw.get(gateway.key(sid)) == before


async def test_revisions_advance_by_one_per_write(gateway: Gateway) -> None:
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    assert (await stored(gateway, sid))["r"] == 1
    await patch(gateway.client, {"a": 2})
    await patch(gateway.client, {"a": 2})  # unchanged: nothing written
    await patch(gateway.client, {"b": 1})
    assert (await stored(gateway, sid))["r"] == 3


async def test_a_session_written_before_revisions_existed_updates(gateway: Gateway) -> None:
    """A value in the first format (no `r`) has revision 0 and is updated normally."""
    await patch(gateway.client, {"a": 1})
    sid = gateway.session_id()
    assert sid is not None
    value = await stored(gateway, sid)
    old_format = (
        '{"v":1,"data":{"a":1},"gw":{"created_at":' + str(value["gw"]["created_at"]) + "}}"
    ).encode()
    await gateway.raw.set(gateway.key(sid), old_format, 600)
    resp = await patch(gateway.client, {"b": 2})
    assert await resp.json() == {"data": {"a": 1, "b": 2}}
    assert (await stored(gateway, sid))["r"] == 1


# -- the agent proxy: racing first requests share one conversation --------------------------


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> ServedUpstream:
    served = await serve_upstream(aiohttp_server)

    async def chat(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    served.fake.on("/v1/chat", chat)
    return served


async def test_racing_first_agent_requests_agree_on_the_conversation(
    gateway_factory: GatewayFactory, upstream: ServedUpstream, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "apps.toml"
    path.write_text(f'[apps.shop]\nupstream = "{upstream.base}"\n')
    gateway = await gateway_factory(kind, APPS_FILE=str(path))
    await patch(gateway.client, {"a": 1}, "shop")  # a session without a conversation yet
    sid = gateway.session_id("shop")
    assert sid is not None
    wrapper = slow(gateway)

    async def chat() -> int:
        resp = await gateway.client.post("/apps/shop/agent/chat", headers=CSRF)
        await resp.read()
        return resp.status

    assert list(await asyncio.gather(chat(), chat())) == [200, 200]
    assert "conflict" in wrapper.results
    threads = {seen.headers[THREAD_HEADER] for seen in upstream.fake.seen}
    assert len(threads) == 1, "two conversations were minted for one session"
    value: dict[str, Any] = await stored(gateway, sid, "shop")
    assert value["gw"]["conversation_id"] in threads
    assert value["data"] == {"a": 1}


async def test_store_metrics_name_the_new_operations(gateway: Gateway) -> None:
    await patch(gateway.client, {"a": 1})
    await patch(gateway.client, {"a": 2})
    await gateway.client.get("/apps/demo/session?slide=0")
    await gateway.client.post("/apps/demo/session/rotate", headers=CSRF)
    samples = await scrape(gateway.client)
    ops = "agent_bff_session_store_operations_total"
    for operation in ("create", "compare_and_set", "peek", "replace"):
        assert value(samples, ops, operation=operation, result="ok") >= 1, operation
