"""`SessionStorage` as an outside aiohttp developer uses it: `aiohttp_session.setup` (the
library's own middleware) on ordinary routes, without the gateway, on the memory store and a
real redis-server. The plain-app example of docs/sessions.md is executed here as written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiohttp.typedefs import Handler
from aiohttp_session import get_session, new_session, session_middleware
from pytest_aiohttp import AiohttpClient

from app.sessions.conflicts import SessionConflict
from app.sessions.ids import session_key
from app.sessions.memory import MemoryBackend
from app.sessions.options import SessionOptions
from app.sessions.storage import SessionStorage
from app.sessions.stored_session import StoredSession
from tests.conftest import MemoryRaw
from tests.redis_server import RedisServer

# aiohttp-session 2.12.1 keeps the session under plain string request keys (aiohttp warns).
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")

DOC = Path(__file__).parent.parent / "docs" / "sessions.md"
COOKIE = "AIOHTTP_SESSION"


class Store:
    """A store as a user passes it (memory backend or redis.asyncio client), plus raw access."""

    def __init__(self, client: aioredis.Redis | None) -> None:
        self.client = client
        self.memory = MemoryBackend() if client is None else None
        self.target: Any = client if client is not None else self.memory

    async def raw(self, key: str) -> bytes | None:
        if self.client is not None:
            value = await self.client.get(key)
            assert value is None or isinstance(value, bytes)
            return value
        assert self.memory is not None
        return await MemoryRaw(self.memory).get(key)

    async def delete(self, key: str) -> None:
        if self.client is not None:
            await self.client.delete(key)
        else:
            assert self.memory is not None
            await self.memory.delete(key)

    async def ttl(self, key: str) -> float | None:
        if self.client is not None:
            ms = await self.client.pttl(key)
            return None if ms < 0 else ms / 1000
        assert self.memory is not None
        return await MemoryRaw(self.memory).ttl(key)

    async def keys(self) -> list[str]:
        if self.client is not None:
            return sorted(
                k.decode() if isinstance(k, bytes) else k for k in await self.client.keys("*")
            )
        assert self.memory is not None
        return sorted(MemoryRaw(self.memory).entries())


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield Store(None)
        return
    server: RedisServer = request.getfixturevalue("shared_redis")
    client = aioredis.Redis.from_url(server.url)
    yield Store(client)
    await client.aclose()


def the_example() -> Callable[[Any], web.Application]:
    """docs/sessions.md's example, executed as written; its `make_app`."""
    text = DOC.read_text()
    block = re.search(r"<!-- example:[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert block is not None, "docs/sessions.md lost its example"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 25, "the example must stay within 25 lines"
    namespace: dict[str, Any] = {"__name__": "docs_sessions_example"}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    make_app: Callable[[Any], web.Application] = namespace["make_app"]
    return make_app


def cookie_of(client: TestClient[Any, Any]) -> str | None:
    for morsel in client.session.cookie_jar:
        if morsel.key == COOKIE:
            return morsel.value
    return None


async def test_the_documented_example_runs_on_ordinary_routes(
    aiohttp_client: AiohttpClient, store: Store
) -> None:
    client = await aiohttp_client(the_example()(store.target))
    assert await (await client.get("/")).json() == {"visits": 1}
    resp = await client.get("/?again")
    assert await resp.json() == {"visits": 2}
    assert resp.cookies[COOKIE]["path"] == "/" and resp.cookies[COOKIE]["httponly"]
    first = cookie_of(client)
    assert first is not None
    # Every top-level key is stored as it is, under {prefix}{namespace}:{sessionId}.
    raw = await store.raw(session_key("myapp:sess:", "default", first))
    assert raw is not None and json.loads(raw)["data"] == {"visits": 2}

    resp = await client.post("/login/ada")
    assert await resp.json() == {"user": "ada"}  # a new session, under a new id
    second = cookie_of(client)
    assert second is not None and second != first
    assert await (await client.get("/")).json() == {"user": "ada", "visits": 1}
    ttl = await store.ttl(session_key("myapp:sess:", "default", second))
    assert ttl is not None and 3590 < ttl <= 3600  # max_age=3600


async def test_a_storage_built_from_a_url_works_and_closes_its_client(
    aiohttp_client: AiohttpClient, shared_redis: RedisServer
) -> None:
    storage = SessionStorage(shared_redis.url)

    async def handler(request: web.Request) -> web.Response:
        session = await get_session(request)
        session["n"] = session.get("n", 0) + 1
        return web.json_response(dict(session))

    app = web.Application(middlewares=[session_middleware(storage)])
    app.router.add_get("/anywhere/{x}", handler)
    client = await aiohttp_client(app)
    assert await (await client.get("/anywhere/a")).json() == {"n": 1}
    assert await (await client.get("/anywhere/b")).json() == {"n": 2}
    await storage.close()
    assert "agent-bff" not in shared_redis.client_names()


async def test_a_lost_race_is_a_409_json_answer_never_a_500(
    aiohttp_client: AiohttpClient, store: Store
) -> None:
    both_loaded = asyncio.Barrier(2)
    first_saved = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        session = await get_session(request)
        if request.query["who"] in ("first", "second"):
            await both_loaded.wait()
        if request.query["who"] == "second":
            await first_saved.wait()
        session[request.query["who"]] = True
        return web.json_response(dict(session))

    @web.middleware
    async def signal(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            if request.query.get("who") == "first":
                first_saved.set()

    storage = SessionStorage(store.target)
    app = web.Application(middlewares=[signal, session_middleware(storage)])
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    await client.get("/?who=start")
    first, second = await asyncio.gather(client.get("/?who=first"), client.get("/?who=second"))
    assert first.status == 200
    assert second.status == 409
    assert second.headers["Retry-After"] == "1"
    assert second.content_type == "application/json"
    body = await second.json()
    assert body["error"]["code"] == "session_conflict"
    assert await (await client.get("/?who=after")).json() == {
        "start": True,
        "first": True,
        "after": True,
    }


async def test_a_session_deleted_meanwhile_is_409_session_ended_not_resurrected(
    aiohttp_client: AiohttpClient, store: Store
) -> None:
    async def handler(request: web.Request) -> web.Response:
        session = await get_session(request)
        if "gone" in request.query:
            await store.delete(session_key("agent:sess:", "default", str(session.identity)))
        session["x"] = 1
        return web.json_response(dict(session))

    app = web.Application(middlewares=[session_middleware(SessionStorage(store.target))])
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    await client.get("/")
    resp = await client.get("/?gone")
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "session_ended"
    assert resp.cookies[COOKIE]["max-age"] == "0"  # the browser's cookie expires
    assert await store.keys() == []  # not written back


async def test_invalidate_new_session_and_changed_as_aiohttp_session_documents(
    aiohttp_client: AiohttpClient, store: Store
) -> None:
    async def handler(request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action == "fresh":
            session = await new_session(request)
            session["fresh"] = 1
        else:
            session = await get_session(request)
        if action == "set":
            session["nested"] = {"list": [1]}
        elif action == "mutate":
            session["nested"]["list"].append(2)  # in place: saved only after changed()
            if "changed" in request.query:
                session.changed()
        elif action == "logout":
            session.invalidate()
        return web.json_response(dict(session))

    app = web.Application(middlewares=[session_middleware(SessionStorage(store.target))])
    app.router.add_get("/{action}", handler)
    client = await aiohttp_client(app)
    await client.get("/set")
    await client.get("/mutate")  # not saved, and the next read is not affected by it
    assert await (await client.get("/read")).json() == {"nested": {"list": [1]}}
    await client.get("/mutate?changed")
    assert await (await client.get("/read")).json() == {"nested": {"list": [1, 2]}}
    before = cookie_of(client)
    assert await (await client.get("/fresh")).json() == {"fresh": 1}
    assert cookie_of(client) not in (None, before)
    resp = await client.get("/logout")
    assert resp.cookies[COOKIE]["max-age"] == "0"
    assert await (await client.get("/read")).json() == {}
    assert await store.keys() == [session_key("agent:sess:", "default", str(before))]


async def test_a_per_session_max_age_holds_on_reads_too(
    aiohttp_client: AiohttpClient, store: Store
) -> None:
    async def handler(request: web.Request) -> web.Response:
        session = await get_session(request)
        if "short" in request.query:
            session.max_age = 5
            session["short"] = True
        return web.json_response({"max_age": session.max_age, **session})

    storage = SessionStorage(store.target, idle_ttl=600)
    app = web.Application(middlewares=[session_middleware(storage)])
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    resp = await client.get("/?short")
    assert resp.cookies[COOKIE]["max-age"] == "5"
    key = session_key("agent:sess:", "default", str(cookie_of(client)))
    assert await (await client.get("/")).json() == {"max_age": 5, "short": True}
    ttl = await store.ttl(key)  # the read's GETEX slid it to 600, its EXPIRE back to 5
    assert ttl is not None and ttl <= 5


async def test_a_namespace_and_cookie_path_per_request(
    aiohttp_client: AiohttpClient, store: Store
) -> None:
    def tenant(request: web.Request) -> str:
        return request.match_info["tenant"]

    def path(request: web.Request) -> str:
        return f"/t/{request.match_info['tenant']}"

    storage = SessionStorage(store.target, key_prefix="x:", namespace=tenant, path=path)

    async def handler(request: web.Request) -> web.Response:
        session = await get_session(request)
        session["seen"] = session.get("seen", 0) + 1
        return web.json_response(dict(session))

    app = web.Application(middlewares=[session_middleware(storage)])
    app.router.add_get("/t/{tenant}/page", handler)
    client = await aiohttp_client(app)
    resp = await client.get("/t/a/page")
    assert resp.cookies[COOKIE]["path"] == "/t/a"
    assert await (await client.get("/t/a/page")).json() == {"seen": 2}
    assert await (await client.get("/t/b/page")).json() == {"seen": 1}  # its own session
    keys = await store.keys()
    assert len(keys) == 2 and {k.split(":")[1] for k in keys} == {"a", "b"}
    assert all(k.startswith("x:") for k in keys)


async def test_the_absolute_lifetime_ends_an_active_session(
    aiohttp_client: AiohttpClient, store: Store
) -> None:
    now = [time.time()]
    storage = SessionStorage(store.target, absolute_lifetime=100, clock=lambda: now[0])

    async def handler(request: web.Request) -> web.Response:
        session = await get_session(request)
        session["n"] = session.get("n", 0) + 1
        return web.json_response(dict(session))

    app = web.Application(middlewares=[session_middleware(storage)])
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    await client.get("/")
    now[0] += 60
    assert await (await client.get("/")).json() == {"n": 2}
    now[0] += 60  # 120 s after creation, however active
    assert await (await client.get("/")).json() == {"n": 1}


def test_meta_fields_live_beside_the_mapping() -> None:
    session = StoredSession(None, data=None, new=True)
    session["conversation_id"] = "the user's own key"
    session.set_meta("conversation_id", "the application's")
    assert dict(session) == {"conversation_id": "the user's own key"}
    assert session.meta == {"conversation_id": "the application's"} and session.modified
    with pytest.raises(ValueError):
        session.set_meta("created_at", 1)
    session.invalidate()
    assert session.meta == {} and session.empty


def test_bad_arguments_are_refused_at_construction() -> None:
    with pytest.raises(TypeError):
        SessionStorage(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decode_responses"):
        SessionStorage(aioredis.Redis(decode_responses=True))
    for bad in ({"idle_ttl": 0}, {"max_age": -1}, {"namespace": "a:b"}, {"namespace": ""}):
        with pytest.raises(ValueError):
            SessionStorage(MemoryBackend(), **bad)


def test_the_conflict_answers_are_http_exceptions_with_a_json_body() -> None:
    conflict = SessionConflict()
    assert isinstance(conflict, web.HTTPConflict) and conflict.status == 409
    assert conflict.text is not None
    assert json.loads(conflict.text)["error"]["code"] == "session_conflict"


def test_meta_cannot_be_changed_behind_the_storage_s_back() -> None:
    """A loaded session's meta may be shared with the decode cache: only `set_meta` changes
    it, and then on a copy."""
    shared = {"conversation_id": "c"}
    session = StoredSession("x" * 43, data=None, new=False, meta=shared)
    with pytest.raises(TypeError):
        session.meta["conversation_id"] = "d"  # type: ignore[index]
    session.set_meta("conversation_id", "d")
    assert shared == {"conversation_id": "c"} and session.meta == {"conversation_id": "d"}


async def test_on_a_user_s_redis_client_a_read_is_one_getex_and_a_write_adds_one_script(
    aiohttp_client: AiohttpClient, shared_redis: RedisServer
) -> None:
    """The Redis budget holds on a client the user made: a read is one `GETEX` that slides
    the TTL; a write of a loaded session adds one round trip, the compare-and-set script
    (`EVALSHA`; Redis also counts the `GET` and `SET` it runs inside)."""
    client = aioredis.Redis.from_url(shared_redis.url)

    async def handler(request: web.Request) -> web.Response:
        session = await get_session(request)
        if "write" in request.query:
            session["n"] = session.get("n", 0) + 1
        return web.json_response(dict(session))

    app = web.Application(middlewares=[session_middleware(SessionStorage(client))])
    app.router.add_get("/", handler)
    http = await aiohttp_client(app)
    await http.get("/?write")  # created (SET NX)
    await http.get("/?write")  # updated: the script is loaded now (EVALSHA, then EVAL once)
    wanted = ("getex", "get", "set", "expire", "evalsha", "eval", "exists", "ttl", "pttl")

    def calls() -> dict[str, int]:
        counted = shared_redis.command_calls()
        return {c: counted[c] for c in wanted if counted.get(c)}

    with shared_redis.client() as admin:
        admin.config_resetstat()
    assert await (await http.get("/")).json() == {"n": 2}
    assert calls() == {"getex": 1}
    with shared_redis.client() as admin:
        admin.config_resetstat()
    assert await (await http.get("/?write")).json() == {"n": 3}
    assert calls() == {"getex": 1, "evalsha": 1, "get": 1, "set": 1}
    await client.aclose()


def test_session_options_are_the_storage_keywords() -> None:
    """`SessionOptions` (what the gateway's wiring builds) names every keyword option of
    `SessionStorage` (but the test clock) with the same default, and `from_options` applies
    them all."""
    parameters = inspect.signature(SessionStorage).parameters
    keywords = {
        name: p.default
        for name, p in parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "clock"
    }
    defaults = {f.name: f.default for f in dataclasses.fields(SessionOptions)}
    assert defaults == keywords
    options = SessionOptions(
        key_prefix="p:",
        namespace="ns",
        idle_ttl=7,
        max_age=9,
        absolute_lifetime=11,
        cookie_name="c",
        domain="example.org",
        path="/x",
        secure=True,
        httponly=False,
        samesite="Strict",
        refresh_cookie=False,
        max_bytes=1000,
        rotation_tombstone_seconds=5,
    )
    storage = SessionStorage.from_options(MemoryBackend(), options)
    assert (storage.key_prefix, storage.idle_ttl, storage.absolute_lifetime) == ("p:", 7, 11)
    assert (storage.cookie_name, storage.max_age, storage.rotation_tombstone_seconds) == ("c", 9, 5)
    assert storage.cookie_params == {
        "domain": "example.org",
        "max_age": 9,
        "path": "/x",
        "secure": True,
        "httponly": False,
        "samesite": "Strict",
    }
