"""`create_app`: the only wiring place. Synchronous; all I/O lives in cleanup contexts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from app.config import Settings
from app.creation_limit import creation_limit_ctx
from app.forwarding import client_scheme
from app.hosts import EXAMPLE, is_loopback
from app.keys import APP_ID_KEY, BACKEND_KEY, LIFECYCLE_KEY, SETTINGS_KEY, STORAGE_APP_KEY
from app.lifecycle import Lifecycle, drain_on_shutdown
from app.logs import flush_logs
from app.metrics import instrument_backend, setup_metrics
from app.middlewares import add_prepare_hook, setup_gateway
from app.proxy.fastread import use as use_relay_fast_paths
from app.redis_env import redact_url
from app.routes import setup_routes
from app.runs.wiring import runs_ctx
from app.sessions.backend import SessionBackend, StoreUnavailable
from app.sessions.memory import MemoryBackend
from app.sessions.options import CookieSecure, SessionOptions
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import RedisOptions, make_client
from app.sessions.storage import SessionStorage
from app.store_hints import startup_hint
from app.upstream import upstream_ctx

log = logging.getLogger(__name__)


class StoreStartupError(Exception):
    """The session store could not be reached at start; `python -m app` exits 1."""


def create_app(settings: Settings, *, backend: SessionBackend | None = None) -> web.Application:
    """The gateway application. `backend` replaces the configured store (tests)."""
    lifecycle = Lifecycle(
        shutdown_timeout=settings.shutdown_timeout_seconds,
        idle_grace=settings.shutdown_idle_grace_seconds,
    )
    app = web.Application(handler_args=server_options(settings))
    app[SETTINGS_KEY] = settings
    app[LIFECYCLE_KEY] = lifecycle
    request_metrics = setup_metrics(app, fast=settings.fast_paths)
    use_relay_fast_paths(settings.fast_paths)  # app/proxy/fastread.py
    # One middleware, outermost first: metrics see every request and its final status; the
    # request id exists before anything can fail; errors are enveloped for everything inside;
    # the application is resolved before origin/CSRF checks (which depend on it); the session
    # is saved after the handler, only for requests that passed (app/middlewares.py). A
    # coroutine frame per step per request was a measurable share of a request's CPU.
    app.middlewares.append(setup_gateway(settings, lifecycle, request_metrics))
    warn_if_any_host_is_served(settings)
    app.cleanup_ctx.append(session_store_ctx(settings, backend))
    # New sessions per client address, a rate limit on the session store
    # (app/creation_limit.py; the agent limits, app/ratelimit.py, need no set-up).
    app.cleanup_ctx.append(creation_limit_ctx(settings))
    # After the store: contexts clean up in reverse, so the upstream client (and the demo
    # agent) close before Redis, which closes last.
    app.cleanup_ctx.append(upstream_ctx(settings))
    # Resumable runs (app/runs/): after the upstream client and the store, so at cleanup the
    # pumps end (and record their end in Redis) before either closes.
    app.cleanup_ctx.append(runs_ctx(settings))
    app.on_shutdown.append(drain_on_shutdown)
    # Access lines held for the end of an event-loop iteration are written before the exit.
    app.on_cleanup.append(flush_logs)
    # One prepare hook: Connection: close while draining, X-Request-Id and security/CORS
    # headers, open streams counted.
    add_prepare_hook(app, lifecycle, request_metrics)
    setup_routes(app)
    return app


def warn_if_any_host_is_served(settings: Settings) -> None:
    """Without `ALLOWED_HOSTS` any Host is served (zero-setup development): say so at start when
    the gateway listens beyond loopback, where a DNS-rebinding page can reach it."""
    if not settings.allowed_hosts and not is_loopback(settings.host):
        log.warning(
            "ALLOWED_HOSTS is empty: any Host name is served on %s (DNS rebinding); set it to "
            "the names browsers use, e.g. %s",
            settings.host,
            EXAMPLE,
        )


def server_options(settings: Settings) -> dict[str, Any]:
    """aiohttp server (connection handler) options; every runner of this app applies them,
    `python -m app` and the tests' servers alike.

    - `keepalive_timeout` = `HEADER_TIMEOUT_SECONDS`: aiohttp arms this timer when a connection
      opens and after each response, and only a complete request head stops it, so it bounds
      a slowloris head (and an idle keep-alive connection); aiohttp 3.14's default is 3630 s.
    - `auto_decompress=False`: request bodies are never decompressed here. The proxy relays
      them upstream byte for byte with their own `Content-Encoding` (decompressing them
      relabelled plain bytes as gzip and cut them to the compressed length), and a compressed
      bomb cannot expand inside the gateway; the session API only takes plain JSON.
    """
    return {"keepalive_timeout": settings.header_timeout_seconds, "auto_decompress": False}


def session_store_ctx(
    settings: Settings, backend: SessionBackend | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        store = backend if backend is not None else await open_store(settings)
        app[BACKEND_KEY] = store
        app[STORAGE_APP_KEY] = gateway_storage(settings, instrument_backend(app, store))
        yield
        await store.close()

    return ctx


def _application_id(request: web.Request) -> str:
    return request[APP_ID_KEY]


def _cookie_path(request: web.Request) -> str:
    return f"/apps/{request[APP_ID_KEY]}"


def gateway_storage(settings: Settings, backend: SessionBackend) -> SessionStorage:
    """The gateway's session storage: the public `SessionStorage` on `backend`, with the
    options `session_options` builds."""
    return SessionStorage.from_options(backend, session_options(settings))


def session_options(settings: Settings) -> SessionOptions:
    """The session layer's options from the gateway's settings: namespaced and its cookie
    scoped per application (`/apps/{applicationId}`), the Secure flag decided here
    (`cookie_secure`). The session package sees these options only, never the settings."""
    return SessionOptions(
        key_prefix=settings.redis_prefix,
        namespace=_application_id,
        idle_ttl=settings.session_ttl_seconds,
        absolute_lifetime=settings.session_absolute_seconds or None,
        cookie_name=settings.cookie_name,
        path=_cookie_path,
        secure=cookie_secure(settings),
        httponly=True,
        samesite=settings.cookie_samesite,
        refresh_cookie=False,  # set once per id: a write of a known session sends no cookie
        encryption_keys=settings.session_encryption_keys,
        max_bytes=settings.session_max_bytes,
        rotation_tombstone_seconds=settings.session_rotation_tombstone_seconds,
    )


def cookie_secure(settings: Settings) -> CookieSecure:
    """`COOKIE_SECURE`: `true`/`false`, or `auto`: Secure when the client used https, as the
    request says it (directly, or in `X-Forwarded-Proto` from a `TRUSTED_PROXIES` hop)."""
    if settings.cookie_secure != "auto":
        return settings.cookie_secure == "true"
    proxies = settings.trusted_proxies

    def secure(request: web.Request) -> bool:
        return client_scheme(request, proxies) == "https"

    return secure


def redis_options(settings: Settings) -> RedisOptions:
    """The Redis client options the settings describe (sessions; runs derive theirs)."""
    assert settings.redis_url is not None
    return RedisOptions(
        url=settings.redis_url,
        op_timeout=settings.redis_op_timeout_seconds,
        socket_timeout=settings.redis_socket_timeout_seconds,
        connect_timeout=settings.redis_connect_timeout_seconds,
        max_connections=settings.redis_max_connections,
        pool_timeout=settings.redis_pool_timeout_seconds,
        health_check_interval=settings.redis_health_check_seconds,
        tls_ca_file=settings.redis_tls_ca_file,
        tls_cert_file=settings.redis_tls_cert_file,
        tls_key_file=settings.redis_tls_key_file,
        tls_verify=settings.redis_tls_verify,
        sentinel_password=settings.redis_sentinel_password,
    )


async def open_store(settings: Settings) -> SessionBackend:
    """The configured backend, checked: Redis must answer PING within the startup timeout."""
    if settings.session_store == "memory":
        log.warning(
            "SESSION_STORE=memory: sessions live in this process only; they do not survive a "
            "restart or span replicas. Use SESSION_STORE=redis for several instances."
        )
        memory = MemoryBackend(
            max_entries=settings.memory_max_sessions, max_bytes=settings.memory_max_bytes
        )
        memory.start_sweeping(settings.memory_sweep_interval_seconds)
        return memory
    assert settings.redis_url is not None
    options = redis_options(settings)
    redis_backend = RedisBackend(make_client(options), op_timeout=options.op_timeout)
    try:
        version = await redis_backend.check_server(settings.redis_startup_timeout_seconds)
    except StoreUnavailable as err:
        await redis_backend.close()
        raise StoreStartupError(
            f"cannot use Redis at REDIS_URL={redact_url(settings.redis_url)} ({err}): "
            + startup_hint(str(err), settings.redis_url)
        ) from err
    log.info(
        "session store: Redis %s at %s, prefix %r, TTL %ss",
        version,
        redact_url(settings.redis_url),
        settings.redis_prefix,
        settings.session_ttl_seconds,
    )
    return redis_backend
