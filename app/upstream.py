"""The upstream HTTP client: one `aiohttp.ClientSession` per process, owned by a cleanup context.

- The connection pool is sized by `UPSTREAM_POOL_SIZE` (default 1000), not aiohttp's 100: every
  open SSE stream holds one upstream connection for its whole life, so the pool must fit the
  concurrent streams of one replica, or new requests queue behind long-lived ones.
- `auto_decompress=False`: bytes pass through unchanged, `Content-Encoding` with them (a proxy
  that decompresses but forwards the header corrupts the body).
- `DummyCookieJar`: the client is shared by every browser, so it must never remember a cookie
  an upstream sets (it would be sent on behalf of the next user).
- `trust_env=False`: `HTTP(S)_PROXY` in the environment does not silently reroute agent traffic.
- No total timeout: streams may last as long as they produce bytes. The proxy applies the
  per-application header and idle timeouts itself.

The built-in demo agent (`upstream = "builtin:demo"`) runs in this process as its own aiohttp
server on `127.0.0.1:<random port>`, started and stopped by the same context, so the proxy path
to it is ordinary HTTP, identical to a remote agent's.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from yarl import URL

from app.applications import AppConfig
from app.config import Settings
from app.demo_agent import start_demo_agent

log = logging.getLogger(__name__)

# How long the demo agent's own server waits for its handlers at shutdown. The gateway's
# streams to it have already ended (or been told to) by then.
_DEMO_SHUTDOWN_SECONDS = 1.0


@dataclass(slots=True)
class Upstream:
    """The process's upstream client and where each application's agent lives."""

    session: aiohttp.ClientSession
    demo_base: URL | None = None

    def base_url(self, app: AppConfig) -> URL:
        """The application's upstream base URL (`builtin:demo` resolved to the local agent)."""
        if app.is_builtin_demo:
            if self.demo_base is None:
                raise RuntimeError("the built-in demo agent is not running")
            return self.demo_base
        return URL(app.upstream, encoded=True)


UPSTREAM_KEY = web.AppKey("upstream", Upstream)


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
        app[UPSTREAM_KEY] = Upstream(session=session, demo_base=demo_base)
        try:
            yield
        finally:
            await session.close()
            if demo_runner is not None:
                await demo_runner.cleanup()

    return ctx
