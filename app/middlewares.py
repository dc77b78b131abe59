"""Cross-cutting request handling: one middleware (`setup_gateway`), steps in this order.

0. Metrics (`app.request_metrics.RequestMetrics`): every request counted with its final status and
   timed, whatever happens inside.
1. Request id: keeps a sane inbound `X-Request-Id` or mints one; echoed on every response.
2. Errors: our failures become the JSON envelope (`_envelope`); never a bare 500 page.
2a. Host: with `ALLOWED_HOSTS` set, a Host (or a trusted proxy's `X-Forwarded-Host`) not
   listed is 421 `host_not_allowed` before
   anything else (`check_host`; DNS rebinding, app/hosts.py); `/healthz`, `/readyz` and
   `/metrics` are exempt (probes and scrapers address a pod by its IP).
3. Application: `/apps/{applicationId}/...` -> 400 malformed, 404 unknown, before anything
   touches the store (`resolve_application`).
4. Origin: the allowlist (403 before anything runs) and CORS preflights (`check_origin`).
5. CSRF: every `/apps/` request whose method is not GET, HEAD or OPTIONS (POST, PUT, PATCH,
   DELETE, and also PROPFIND, QUERY, any extension method) needs `X-CSRF: 1`, else 403
   (`check_csrf`).
6. Session: after the handler, a changed session is saved (`finish_session`); a session that
   ended or kept changing meanwhile answers 409 (app/sessions/middleware.py).
7. Unread body: an error answer (4xx, 5xx) sent before the request body was all received
   says `Connection: close` and the connection closes right after it (`answer_and_close`).

One middleware rather than seven, and one `on_response_prepare` hook (`add_prepare_hook`)
rather than three: a coroutine frame per step per request was a measurable share of a
request's CPU (scripts/bench.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Mapping

from aiohttp import web, web_response
from aiohttp.typedefs import Handler, Middleware

from app.applications import APP_ID_RE, AppConfig
from app.config import Settings
from app.errors import ApiError, error_response, store_error
from app.forwarding import client_host, own_origin, peer_is_trusted
from app.hosts import HostAllowlist
from app.keys import (
    APP_CONFIG_KEY,
    APP_ID_KEY,
    CORS_ORIGIN_KEY,
    REQUEST_ID_KEY,
    RESPONSE_STARTED_KEY,
    SESSION_KEY,
    STORAGE_APP_KEY,
    STORAGE_KEY,
)
from app.lifecycle import Lifecycle, close_connections_when_draining
from app.logs import bind_request, release_request
from app.proxy.headers import PROXIED_CSP
from app.request_metrics import CLIENT_CLOSED, RequestMetrics
from app.sessions.backend import StoreUnavailable
from app.sessions.conflicts import SessionConflict, SessionEnded
from app.sessions.middleware import finish_session, session_error_response

log = logging.getLogger(__name__)

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# The only methods exempt from the CSRF header: safe ones (RFC 9110 §9.2.1) that a form or a
# plain link can send. Anything else (PROPFIND, QUERY, `get` in lower case, an unknown token)
# may change state upstream, so it is treated as unsafe: an allowlist, not a denylist.
CSRF_EXEMPT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CORS_ALLOW_HEADERS = "Content-Type, X-CSRF, Accept, Last-Event-ID, X-Request-Id, Authorization"
CORS_ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
# The `Server` header of every response: the product only, never versions (aiohttp's default,
# `Python/3.x aiohttp/3.y`, tells a scanner which advisories to try). Also replaces an
# upstream's own `Server` on proxied answers.
SERVER_HEADER = "agent-bff"
# On every response the gateway sends, unless the response set its own (the demo page its
# page policy): no sniffing, no referrer, and the sandbox policy of relayed answers
# (`PROXIED_CSP`): a JSON error, a session document or a probe answer opened as a page is
# inert in the gateway's origin, like anything an upstream sends (docs/security.md).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": PROXIED_CSP,
}


def _on_prepare_headers(
    request: web.Request, response: web.StreamResponse, request_id: str
) -> None:
    request[RESPONSE_STARTED_KEY] = True
    headers = response.headers
    headers["X-Request-Id"] = request_id
    for name, value in SECURITY_HEADERS.items():
        headers.setdefault(name, value)
    # Set only for a request with an allowed `Origin` (a missing key is a costly lookup).
    origin = request.get(CORS_ORIGIN_KEY) if "Origin" in request.headers else None
    if origin is not None:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Allow-Credentials"] = "true"
        headers["Access-Control-Expose-Headers"] = "X-Request-Id, X-Run-Id"
        headers.add("Vary", "Origin")


def _envelope(request: web.Request, exc: Exception) -> web.StreamResponse | None:
    """The JSON envelope for `exc` raised while handling `request`, or None: re-raise it (a
    redirect or other non-error `HTTPException`, or a failure after a stream started)."""
    if isinstance(exc, ApiError):
        return error_response(request, exc.status, exc.code, exc.message, headers=exc.headers)
    if isinstance(exc, StoreUnavailable):
        log.warning("session store unavailable: %s", exc)
        unavailable = store_error(exc)
        return error_response(
            request, 503, unavailable.code, unavailable.message, headers=unavailable.headers
        )
    if isinstance(exc, (SessionEnded, SessionConflict)):
        # The storage's own 409s (HTTP exceptions): answered by the session step; here only
        # when raised outside it.
        return session_error_response(request, request.app[STORAGE_APP_KEY], exc)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            return None
        code = re.sub(r"[^a-z0-9]+", "_", (exc.reason or "error").lower()).strip("_")
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return error_response(request, exc.status, code, exc.reason, headers=headers)
    if request.get(RESPONSE_STARTED_KEY):
        return None  # a stream already started: aiohttp ends the connection
    # A bug: still our envelope (never aiohttp's text/plain page), details only in the log.
    log.error("unhandled error: %s %s", request.method, request.path, exc_info=exc)
    return error_response(request, 500, "internal_error", "Internal error.")


def add_prepare_hook(
    app: web.Application, lifecycle: Lifecycle, metrics: RequestMetrics | None = None
) -> None:
    """One `on_response_prepare` hook for every response, streams included: `Connection:
    close` while draining (`close_connections_when_draining`), `X-Request-Id`, the security and
    CORS headers, and the count of open streams."""

    hide_server_version()

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = SERVER_HEADER
        if lifecycle.shutting_down:
            await close_connections_when_draining(request, response)
        # `in`/`get` on a request are Python code around `__getitem__`: index it directly.
        try:
            request_id = request[REQUEST_ID_KEY]
        except KeyError:
            pass  # a request the gateway middleware never saw
        else:
            _on_prepare_headers(request, response, request_id)
        if metrics is not None:
            metrics.count_stream(request, response)

    app.on_response_prepare.append(on_prepare)


def hide_server_version() -> None:
    """Make aiohttp's own default `Server` value `SERVER_HEADER`, for the answers no prepare
    hook sees: aiohttp's 400 for a request its parser refuses is built before any application
    is matched. (`aiohttp.web_response` reads the module global `SERVER_SOFTWARE` when it fills
    in `Server`; tests/test_server_header.py fails if a new aiohttp stops doing so.)"""
    web_response.SERVER_SOFTWARE = SERVER_HEADER  # type: ignore[attr-defined]  # not re-exported


# Served whatever the Host: kubelet probes and Prometheus address a pod by its IP, and these
# answers touch no session and no upstream.
HOST_EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def check_host(request: web.Request, allowlist: HostAllowlist, settings: Settings) -> None:
    """421 `host_not_allowed` unless every host name the request claims is in
    `ALLOWED_HOSTS`: `Host`, and behind `TRUSTED_PROXIES` also the proxy's `X-Forwarded-Host`
    when it sends one (what `client_host` believes). Both, so a trusted proxy that passes a
    browser's own `X-Forwarded-Host` through (a rebinding page may set it with `fetch`) cannot
    vouch for a foreign Host, nor the reverse. `HOST_EXEMPT_PATHS` answer any Host."""
    headers = request.headers
    if allowlist.allows(headers.get("Host", "")):
        forwarded = headers.get("X-Forwarded-Host")
        if forwarded is None or not peer_is_trusted(request, settings.trusted_proxies):
            return
        if allowlist.allows(client_host(request, settings.trusted_proxies)):
            return
    if request.path in HOST_EXEMPT_PATHS:
        return
    raise ApiError(421, "host_not_allowed", "This gateway does not serve this host name.")


def resolve_application(request: web.Request, apps: Mapping[str, AppConfig]) -> AppConfig:
    """The request's application; 400 for a malformed id, 404 for an unknown one.

    `apps`: the configured applications whose ids are well-formed (`known_applications`), so a
    hit needs no pattern check."""
    app_id = request.match_info["applicationId"]
    app_config = apps.get(app_id)
    if app_config is None:
        if not APP_ID_RE.fullmatch(app_id):  # fullmatch: `$` accepts a trailing \n
            raise ApiError(400, "invalid_application_id", "The application id is malformed.")
        raise ApiError(404, "unknown_application", "No such application.")
    request[APP_ID_KEY] = app_id
    request[APP_CONFIG_KEY] = app_config
    return app_config


def known_applications(settings: Settings) -> dict[str, AppConfig]:
    """The configured applications whose ids match `APP_ID_RE` (all of them, as loaded)."""
    return {k: v for k, v in settings.apps.items() if APP_ID_RE.fullmatch(k)}


def check_origin(
    request: web.Request, settings: Settings, app_config: AppConfig
) -> web.Response | None:
    """403 for a foreign `Origin`; the preflight answer for an allowed one; else None.

    Requests without `Origin` (same-origin navigations, non-browser clients) pass.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    normalized = origin.rstrip("/").lower()
    allowed = normalized in app_config.allowed_origins
    if not allowed and normalized != own_origin(request, settings.trusted_proxies):
        raise ApiError(403, "origin_not_allowed", "This origin may not call this application.")
    if allowed:
        request[CORS_ORIGIN_KEY] = origin
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response = web.Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = CORS_ALLOW_METHODS
        response.headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"
        return response
    return None


def check_csrf(request: web.Request) -> None:
    """403 `csrf_header_missing` unless the method is GET, HEAD or OPTIONS (case-sensitive, as
    HTTP methods are) or the request carries `X-CSRF: 1`. A browser sends a custom header only
    from same-origin script or after a CORS preflight the origin check answered."""
    if request.method not in CSRF_EXEMPT_METHODS and request.headers.get("X-CSRF") != "1":
        raise ApiError(
            403, "csrf_header_missing", "State-changing requests must carry the header X-CSRF: 1."
        )


async def answer_and_close(
    request: web.Request, response: web.StreamResponse
) -> web.StreamResponse:
    """Send `response` (an error answered before the request body was all received) with
    `Connection: close`, then close the connection at once: left to itself aiohttp would
    read and discard the rest of the body for up to 10 s (its `lingering_time`), so an
    uploader that stalled (408) or was refused (413, 403 ...) would hold the connection.

    A response already started (a relayed stream) or a connection already gone is left as
    it is."""
    transport = request.transport
    if response.prepared or transport is None or transport.is_closing():
        return response
    response.force_close()
    _ = request.remote  # cached now: the access log reads it after the transport is gone
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # flushes the answer, then closes; aiohttp skips lingering
    return response


class _RequestIds:
    """128 random bits as 32 hex digits per id (what `secrets.token_hex(16)` gives), the
    random bytes fetched from the OS for 64 ids at a time instead of one system call each; a
    forked child starts a batch of its own."""

    _BATCH = 64

    def __init__(self) -> None:
        self._hex = ""
        self._next = 0
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._hex = ""
        self._next = 0

    def __call__(self) -> str:
        start = self._next
        if start >= len(self._hex):
            self._hex = os.urandom(16 * self._BATCH).hex()
            start = 0
        self._next = start + 32
        return self._hex[start : start + 32]


new_request_id = _RequestIds()


def setup_gateway(
    settings: Settings, lifecycle: Lifecycle, metrics: RequestMetrics | None = None
) -> Middleware:
    """Metrics -> request id -> errors -> host -> application -> origin -> CSRF -> session, in
    one middleware."""
    perf_counter = time.perf_counter
    apps = known_applications(settings)
    hosts = HostAllowlist(settings.allowed_hosts) if settings.allowed_hosts else None

    @web.middleware
    async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = perf_counter()
        bound = bind_request(request, started)  # log context (app/logs.py)
        status = "500"  # unless a response (or an HTTP exception) says otherwise
        if metrics is not None:
            metrics.begin(request)
        try:
            request[SESSION_KEY] = None  # not loaded yet
            inbound = request.headers.get("X-Request-Id")
            request[REQUEST_ID_KEY] = (
                inbound
                if inbound is not None and _REQUEST_ID_RE.fullmatch(inbound)
                else new_request_id()
            )
            lifecycle.request_started()
            try:
                if hosts is not None:
                    check_host(request, hosts, settings)
                if "applicationId" in request.match_info:
                    app_config = resolve_application(request, apps)
                    preflight = check_origin(request, settings, app_config)
                    if preflight is not None:
                        status = str(preflight.status)
                        return preflight
                    check_csrf(request)
                storage = request.app[STORAGE_APP_KEY]
                request[STORAGE_KEY] = storage
                try:
                    response = await handler(request)
                    await finish_session(request, response)
                except (SessionEnded, SessionConflict) as exc:
                    response = session_error_response(request, storage, exc)
            except Exception as exc:
                envelope = _envelope(request, exc)
                if envelope is None:
                    raise
                response = envelope
            finally:
                lifecycle.request_finished()
            status = str(response.status)
            if response.status >= 400 and not request.content.is_eof():
                return await answer_and_close(request, response)
            return response
        except web.HTTPException as exc:
            status = str(exc.status)
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            if metrics is not None:
                metrics.end(request, status, started)
            release_request(bound)

    return gateway_middleware
