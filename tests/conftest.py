"""Shared fixtures: real `redis-server`s, settings with short timeouts, gateways in-process
(memory, fakeredis, real Redis) and as real `python -m app` processes.

Fixtures (all function-scoped unless noted):
- `session_redis` (session scope): one `RedisServer` for the whole run. Never kill it.
- `shared_redis`: `session_redis`, flushed and its command stats reset before the test.
- `redis_server`: a private `RedisServer`; kill/restart/pause it freely.
- `settings_factory(**env)`: `Settings` from `TEST_ENV` + `env` (no `.env` file is read).
- `gateway_factory(kind, **env)`: an in-process gateway (`Gateway`) on `kind` in
  `"memory" | "fakeredis" | "redis"` (`"redis"` uses `shared_redis` unless `REDIS_URL` is given).
- `kind`: each of `STORE_KINDS` (for `gateway_factory(kind, ...)`).
- `gateway`: parametrized over all three kinds; `memory_gateway`, `fakeredis_gateway`,
  `redis_gateway` for one kind.
- `gateway_process(env)`: a started `python -m app` (`GatewayProcess`), stopped at teardown.
- `upstream`: a fake upstream agent (`tests.fake_upstream.ServedUpstream`); `gw`: the gateway
  (`RunningGateway`, served as `python -m app` serves it) whose only app, `shop`, points at it.
  Modules needing other app settings or routes override either fixture.
- `browser`: a headless Chromium (`CHROMIUM`) driven by Playwright, closed at teardown.

Tiers: every test gets one marker, `fast`, `integration` or `system`, from the fixtures it uses
(tests/tiers.py); a test that starts processes without a fixture says so with
`@pytest.mark.system` (or `integration` for a redis-server). `-m fast` is the inner loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import fakeredis
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient, AiohttpServer

from app.config import Settings
from app.keys import BACKEND_KEY, SETTINGS_KEY
from app.main import create_app
from app.sessions.backend import SessionBackend
from app.sessions.ids import session_key
from app.sessions.memory import MemoryBackend
from app.sessions.redis import RedisBackend
from tests import tiers
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page, Route

    from tests.fake_upstream import RunningGateway, ServedUpstream

# Short timeouts so failure paths stay fast; a test overrides any of them.
TEST_ENV: dict[str, str] = {
    "SESSION_STORE": "memory",
    "REDIS_OP_TIMEOUT_SECONDS": "1",
    "REDIS_SOCKET_TIMEOUT_SECONDS": "0.25",
    "REDIS_CONNECT_TIMEOUT_SECONDS": "0.25",
    "REDIS_POOL_TIMEOUT_SECONDS": "0.5",
    "REDIS_STARTUP_TIMEOUT_SECONDS": "2",
    "SHUTDOWN_TIMEOUT_SECONDS": "2",
    "MEMORY_SWEEP_INTERVAL_SECONDS": "3600",
    "DEMO_TOKEN_DELAY_SECONDS": "0.001",
}

STORE_KINDS = ("memory", "fakeredis", "redis")
CSRF = {"X-CSRF": "1"}


# -- tiers (tests/tiers.py) -----------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by the markers given here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test gets its tier marker: fast, integration or system."""
    for item in items:
        tiers.assign(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """A test's fixtures are set up under its tier's guard."""
    with tiers.guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A test runs under its tier's guard."""
    with tiers.guard(item):
        return (yield)


def pytest_configure(config: pytest.Config) -> None:
    """A fixture beyond the tier of the guarded test fails it (`tiers.FixtureGuard`)."""
    config.pluginmanager.register(tiers.FixtureGuard(), "tiers-fixture-guard")


@pytest.fixture(scope="session")
def tier_integration() -> None:
    """Requested by a fixture that starts a redis-server (or a topology) of its own: every test
    using that fixture is `integration` at least."""


@pytest.fixture(scope="session")
def tier_system() -> None:
    """Requested by a fixture that starts other processes (`python -m app`, scripts, nginx):
    every test using that fixture is `system`."""


# -- real redis-server ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def session_redis() -> Iterator[RedisServer]:
    """One redis-server for the whole run (fast). Do not kill or pause it: use `redis_server`."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def shared_redis(session_redis: RedisServer) -> RedisServer:
    """The session-wide server, empty and with zeroed `INFO commandstats`."""
    if not session_redis.running:  # a test broke the rule; heal for the next ones
        session_redis.restart()
    session_redis.reset()
    return session_redis


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server (no AOF) this test may kill, restart, pause."""
    with RedisServer() as server:
        yield server


# -- settings -------------------------------------------------------------------------------


SettingsFactory = Callable[..., Settings]


def make_settings(env: Mapping[str, str] | None = None, /, **more: str) -> Settings:
    """`Settings` from `TEST_ENV` + `env` + `more` (variables by their env names)."""
    environ = dict(TEST_ENV)
    environ.update(env or {})
    environ.update(more)
    return Settings.from_env(environ, dotenv_path=None)


@pytest.fixture
def settings_factory() -> SettingsFactory:
    """`settings_factory(SESSION_TTL_SECONDS="60", ...)` -> `Settings` (no `.env` read)."""
    return make_settings


# -- in-process gateways --------------------------------------------------------------------


class RawStore(Protocol):
    """Direct access to what a gateway's store holds, bypassing the gateway (assertions)."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: int) -> None: ...

    async def ttl(self, key: str) -> float | None:
        """Seconds left, None when the key is absent."""
        ...

    async def keys(self) -> list[str]: ...

    async def delete(self, key: str) -> None: ...


class MemoryRaw:
    """A memory store read and written as tests need, through its public operations (`peek`
    neither slides nor counts as a use); only `keys` looks inside."""

    def __init__(self, backend: MemoryBackend) -> None:
        self.backend = backend

    async def get(self, key: str) -> bytes | None:
        peeked = await self.backend.peek(key)
        return None if peeked is None else peeked[0]

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        if await self.backend.replace(key, value, ttl) is None:
            await self.backend.create(key, value, ttl)

    async def ttl(self, key: str) -> float | None:
        peeked = await self.backend.peek(key)
        return None if peeked is None else peeked[1]

    def entries(self) -> list[str]:
        """Every key (live or not yet swept), least recently used first per segment."""
        memory = self.backend
        return [
            k.decode("utf-8", "surrogatepass") for k in (*memory._probation, *memory._protected)
        ]

    async def keys(self) -> list[str]:
        return [k for k in self.entries() if await self.get(k) is not None]

    async def delete(self, key: str) -> None:
        await self.backend.delete(key)


class RedisRaw:
    """Over any `redis.asyncio.Redis` (fakeredis included), bytes in and out."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def get(self, key: str) -> bytes | None:
        value = await self.client.get(key)
        assert value is None or isinstance(value, bytes)
        return value

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        await self.client.set(key, value, ex=ttl)

    async def ttl(self, key: str) -> float | None:
        ms: int = await self.client.pttl(key)
        if ms == -2:
            return None
        return float("inf") if ms == -1 else ms / 1000

    async def keys(self) -> list[str]:
        raw = await self.client.keys("*")
        return sorted(k.decode() if isinstance(k, bytes) else k for k in raw)

    async def delete(self, key: str) -> None:
        await self.client.delete(key)


@dataclass
class Gateway:
    """An in-process gateway under the aiohttp test client, plus direct store access."""

    kind: str
    client: TestClient[web.Request, web.Application]
    raw: RawStore
    redis_server: RedisServer | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def app(self) -> web.Application:
        return self.client.app

    @property
    def settings(self) -> Settings:
        return self.app[SETTINGS_KEY]

    @property
    def backend(self) -> SessionBackend:
        return self.app[BACKEND_KEY]

    def session_id(self, app_id: str = "demo") -> str | None:
        """The session cookie the client's jar holds for `/apps/{app_id}`."""
        for morsel in self.client.session.cookie_jar:
            if morsel.key == self.settings.cookie_name and morsel["path"] == f"/apps/{app_id}":
                return morsel.value
        return None

    def key(self, session_id: str, app_id: str = "demo") -> str:
        return session_key(self.settings.redis_prefix, app_id, session_id)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway_factory(
    aiohttp_client: AiohttpClient, request: pytest.FixtureRequest
) -> AsyncIterator[GatewayFactory]:
    """`await gateway_factory("redis", SESSION_TTL_SECONDS="60")` -> `Gateway`."""
    to_close: list[aioredis.Redis] = []

    async def make(kind: str, env: Mapping[str, str] | None = None, /, **more: str) -> Gateway:
        environ = dict(env or {})
        environ.update(more)
        server: RedisServer | None = None
        backend: SessionBackend | None = None
        if kind == "memory":
            settings = make_settings(environ, SESSION_STORE="memory")
        elif kind == "fakeredis":
            environ.setdefault("REDIS_URL", "redis://fakeredis.invalid:6379/0")
            settings = make_settings(environ, SESSION_STORE="redis")
            fake = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
            backend = RedisBackend(fake, op_timeout=settings.redis_op_timeout_seconds)
        elif kind == "redis":
            if "REDIS_URL" not in environ:
                server = request.getfixturevalue("shared_redis")
                environ["REDIS_URL"] = server.url
            settings = make_settings(environ, SESSION_STORE="redis")
        else:
            raise ValueError(f"unknown store kind {kind!r}")
        client = await aiohttp_client(create_app(settings, backend=backend))
        store = client.app[BACKEND_KEY]
        raw: RawStore
        if isinstance(store, MemoryBackend):
            raw = MemoryRaw(store)
        elif kind == "fakeredis":
            assert isinstance(store, RedisBackend)
            # The fakeredis client the test built (typed as the backend's client union).
            raw = RedisRaw(cast(aioredis.Redis, store.client))
        else:
            assert settings.redis_url is not None
            direct = aioredis.Redis.from_url(settings.redis_url, decode_responses=False)
            to_close.append(direct)
            raw = RedisRaw(direct)
        return Gateway(kind=kind, client=client, raw=raw, redis_server=server)

    yield make
    for direct in to_close:
        await direct.aclose()


@pytest.fixture(params=STORE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Each store kind, for tests that build their gateway with `gateway_factory`."""
    value: str = request.param
    return value


@pytest.fixture(params=STORE_KINDS)
async def gateway(request: pytest.FixtureRequest, gateway_factory: GatewayFactory) -> Gateway:
    """The default gateway (app `demo`) on each store: memory, fakeredis, real Redis."""
    kind: str = request.param
    return await gateway_factory(kind)


@pytest.fixture
async def memory_gateway(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory("memory")


@pytest.fixture
async def fakeredis_gateway(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory("fakeredis")


@pytest.fixture
async def redis_gateway(gateway_factory: GatewayFactory) -> Gateway:
    """On `shared_redis` (flushed, stats reset); `gateway.redis_server` is that server."""
    return await gateway_factory("redis")


# -- real gateway processes -----------------------------------------------------------------


GatewayProcessFactory = Callable[..., GatewayProcess]


@pytest.fixture
def gateway_process() -> Iterator[GatewayProcessFactory]:
    """`gateway_process({"SESSION_STORE": "redis", ...})` -> a started, healthy process.

    Pass `start=False` to only spawn it. Every process is killed (by PID) at teardown if the
    test did not stop it.
    """
    procs: list[GatewayProcess] = []

    def make(
        env: Mapping[str, str] | None = None, *, start: bool = True, **kwargs: Any
    ) -> GatewayProcess:
        proc = GatewayProcess(env, **kwargs)
        procs.append(proc)
        return proc.start() if start else proc.spawn()

    yield make
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.close()


# -- a fake upstream agent and an in-process gateway in front of it ---------------------------


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> ServedUpstream:
    """A fake upstream agent (`tests.fake_upstream.FakeUpstream`) on a free loopback port."""
    # Imported here: tests.fake_upstream imports this module (make_settings).
    from tests.fake_upstream import serve_upstream

    return await serve_upstream(aiohttp_server)


@pytest.fixture
async def gw(upstream: ServedUpstream) -> AsyncIterator[RunningGateway]:
    """The gateway, served as `python -m app` serves it, whose only app `shop` points at
    `upstream` with default app settings."""
    from tests.fake_upstream import app_settings, run_gateway

    async with run_gateway(app_settings(upstream.base)) as gateway:
        yield gateway


# -- a real browser ---------------------------------------------------------------------------


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium (`CHROMIUM`, installed by scripts/system-deps) via Playwright."""
    # Imported here so that only browser tests load Playwright.
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


FRONTEND_PAGE = "/__frontend__.html"


async def open_frontend_page(page: Page, origin: str) -> None:
    """Open a blank page of `origin` on which script may run, as a frontend served on the
    gateway's origin would be. Every answer of the gateway itself carries the sandbox CSP
    (docs/security.md), so none of its own URLs can serve as one: the browser answers
    `FRONTEND_PAGE` itself, and every other request of the page goes to the network."""

    async def fulfill(route: Route) -> None:
        await route.fulfill(status=200, content_type="text/html", body="<!doctype html>")

    await page.route(origin + FRONTEND_PAGE, fulfill)
    await page.goto(origin + FRONTEND_PAGE)
