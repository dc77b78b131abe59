"""The upstream HTTP client: one `aiohttp.ClientSession` per process, owned by a cleanup context.

- The connection pool is sized by `UPSTREAM_POOL_SIZE` (default 1000), not aiohttp's 100: every
  open SSE stream holds one upstream connection for its whole life, so the pool must fit the
  concurrent streams of one replica. It never makes a request wait: the proxy takes a slot of
  `capacity` (app/capacity.py) first, and the slots of all applications fit in the pool.
- `auto_decompress=False`: bytes pass through unchanged, `Content-Encoding` with them (a proxy
  that decompresses but forwards the header corrupts the body).
- `DummyCookieJar`: the client is shared by every browser, so it must never remember a cookie
  an upstream sets (it would be sent on behalf of the next user).
- `trust_env=False`: `HTTP(S)_PROXY` in the environment does not silently reroute agent traffic.
- No total timeout: streams may last as long as they produce bytes. The proxy applies the
  per-application header and idle timeouts itself (`connect_timeout` below is the only
  per-request client timeout; one `ClientTimeout` per distinct value, not per request).
- `skip_auto_headers` (`Accept`, `Accept-Encoding`, `User-Agent`, `Content-Type`) is set once on
  the session: the upstream sees what the browser sent, nothing aiohttp would invent.
- TCP_NODELAY is on for every upstream connection (aiohttp sets it when a connection is made),
  as it is on the browser side; keep-alive connections are pooled and reused (15 s idle).

`StreamStop` turns the lifecycle's `stop_streams` event into callbacks: one task per process
waits for it on behalf of every open relay (not one task per stream).

The built-in demo agent (`upstream = "builtin:demo"`) runs in this process as its own aiohttp
server on `127.0.0.1:<random port>`, started and stopped by the same context, so the proxy path
to it is ordinary HTTP, identical to a remote agent's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from yarl import URL

from app.applications import AppConfig
from app.capacity import CapacityCollector, UpstreamCapacity
from app.config import Settings
from app.demo_agent import start_demo_agent
from app.keys import LIFECYCLE_KEY, UPSTREAM_KEY
from app.metrics import exported

log = logging.getLogger(__name__)

# How long the demo agent's own server waits for its handlers at shutdown. The gateway's
# streams to it have already ended (or been told to) by then.
_DEMO_SHUTDOWN_SECONDS = 1.0
# Headers aiohttp would add on its own: never sent (the upstream sees the browser's only).
SKIP_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


class StreamStop:
    """`event` (the lifecycle's `stop_streams`) as callbacks for the open relays.

    `subscribe(callback)`: `callback()` runs once when the event is set (one loop step later,
    from the waiting task), unless `unsubscribe`d before. `is_set` reads the event itself.
    Create inside the running loop; `close()` ends the waiting task.
    """

    __slots__ = ("_callbacks", "_event", "_task")

    def __init__(self, event: asyncio.Event) -> None:
        self._event = event
        self._callbacks: dict[Callable[[], None], None] = {}
        self._task = asyncio.ensure_future(self._wait())

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks[callback] = None

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.pop(callback, None)

    async def _wait(self) -> None:
        await self._event.wait()
        callbacks, self._callbacks = self._callbacks, {}
        for callback in callbacks:
            callback()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@dataclass(slots=True)
class Upstream:
    """The process's upstream client, where each application's agent lives, the shutdown
    signal its relays listen to, and how many requests each application may have open."""

    session: aiohttp.ClientSession
    stop: StreamStop
    capacity: UpstreamCapacity
    demo_base: URL | None = None

    def base_url(self, app: AppConfig) -> URL:
        """The application's upstream base URL (`builtin:demo` resolved to the local agent)."""
        if app.is_builtin_demo:
            if self.demo_base is None:
                raise RuntimeError("the built-in demo agent is not running")
            return self.demo_base
        return URL(app.upstream, encoded=True)


@functools.lru_cache(maxsize=64)
def request_timeout(connect_timeout: float) -> aiohttp.ClientTimeout:
    """The client timeout of one upstream request (shared: `ClientTimeout` is immutable)."""
    return aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout)


def make_client_session(pool_size: int) -> aiohttp.ClientSession:
    """The shared upstream client (see the module docstring for why each option)."""
    connector = aiohttp.TCPConnector(limit=pool_size, limit_per_host=0)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None),
        raise_for_status=False,
        skip_auto_headers=SKIP_AUTO_HEADERS,
    )


def upstream_ctx(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """Cleanup context: the client (and the demo agent if an application uses it)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        demo_runner: web.AppRunner | None = None
        demo_base: URL | None = None
        if any(a.is_builtin_demo for a in settings.apps.values()):
            demo_runner, demo_base = await start_demo_agent(
                token_delay=settings.demo_token_delay_seconds,
                shutdown_timeout=_DEMO_SHUTDOWN_SECONDS,
            )
            log.info("built-in demo agent listening on %s (loopback only)", demo_base)
        session = make_client_session(settings.upstream_pool_size)
        stop = StreamStop(app[LIFECYCLE_KEY].stop_streams)
        capacity = UpstreamCapacity(settings.apps, settings.upstream_pool_size)
        app[UPSTREAM_KEY] = Upstream(
            session=session, stop=stop, capacity=capacity, demo_base=demo_base
        )
        try:
            with exported(app, CapacityCollector(capacity)):
                yield
        finally:
            await stop.close()
            await session.close()
            if demo_runner is not None:
                await demo_runner.cleanup()

    return ctx
