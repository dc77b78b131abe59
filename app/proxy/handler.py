"""The agent proxy's handler, `agent_proxy`: the checks before the upstream is contacted, the
upstream slots, the session and conversation, the upstream call, then the relay (or a run, for
a resumable application). The contract, in request order, is the package docstring
(app/proxy/__init__.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from app.capacity import UpstreamBusy, client_key, warn_if_clients_look_alike
from app.errors import ApiError, store_full, store_unavailable
from app.keys import APP_CONFIG_KEY, LIFECYCLE_KEY, SETTINGS_KEY, UPSTREAM_KEY
from app.metrics import record_upstream_error, record_upstream_first_byte
from app.proxy.exchange import BodyStalled, BodyTooLarge, Exchange
from app.proxy.headers import (
    ROTATE_HEADER,
    forwardable_headers,
    has_invalid_header,
    is_event_stream,
    is_websocket_upgrade,
    upstream_request_headers,
)
from app.proxy.relay import RelayResponse, relay
from app.proxy.urls import InvalidPath, build_upstream_url, redirect_leaves_application
from app.proxy.watch import DisconnectWatch
from app.ratelimit import enforce_rate_limits
from app.runs.http import start_run
from app.sessions.backend import StoreFull, StoreUnavailable
from app.sessions.middleware import get_session, rotate_session, update_session
from app.sessions.storage import StoredSession
from app.upstream import request_timeout

log = logging.getLogger(__name__)

CONVERSATION_FIELD = "conversation_id"
_CONVERSATION_RE = re.compile(r"^[A-Za-z0-9_-]{22,86}$")
# Request bodies up to this declared length are read whole, then sent upstream as bytes.
SMALL_BODY_BYTES = 64 * 1024

# Methods never sent upstream (405): TRACE/TRACK make an upstream echo the request it received,
# the application's configured credential headers included; CONNECT asks for a tunnel.
NEVER_PROXIED_METHODS = frozenset({"TRACE", "TRACK", "CONNECT"})
PROXIED_METHODS_ALLOW = "GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE"
# The only statuses relayed: final ones. Anything else is 502 `upstream_protocol_error`.
RELAYED_STATUSES = (200, 599)


def ensure_conversation(session: StoredSession) -> str:
    """The session's conversation id (a metadata field, beside the browser's data), minted
    (and the session marked changed) if absent."""
    current = session.meta.get(CONVERSATION_FIELD)
    if isinstance(current, str) and _CONVERSATION_RE.match(current):
        return current
    conversation_id = secrets.token_urlsafe(24)
    session.set_meta(CONVERSATION_FIELD, conversation_id)
    return conversation_id


async def agent_proxy(request: web.Request) -> web.StreamResponse:
    """Handler for every method on `/apps/{applicationId}/agent/{path:.*}`."""
    exchange = Exchange(
        request=request,
        app=request[APP_CONFIG_KEY],
        settings=request.app[SETTINGS_KEY],
        lifecycle=request.app[LIFECYCLE_KEY],
    )
    inner = asyncio.create_task(_proxy_holding_slots(exchange))
    watcher = DisconnectWatch(exchange, inner)
    try:
        return await inner
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not exchange.client_gone or (task is not None and task.cancelling()):
            raise
        # A resumable run (app/runs/) outlives its first request: its upstream goes on.
        run = exchange.response is not None and "X-Run-Id" in exchange.response.headers
        log.info(
            "browser disconnected; %s (app %s, request %s)",
            "its run goes on" if run else "upstream request cancelled",
            exchange.app.app_id,
            exchange.request_id,
        )
        if exchange.response is not None and exchange.response.prepared:
            return exchange.response
        return web.Response(status=499)  # nginx's "client closed request", for the access log
    finally:
        watcher.cancel()


async def _proxy_holding_slots(exchange: Exchange) -> web.StreamResponse:
    """`_proxy`, then the upstream slots it took are returned, however it ended (its own
    `finally` has released or closed the upstream response by then)."""
    try:
        return await _proxy(exchange)
    finally:
        if exchange.slots is not None:
            exchange.request.app[UPSTREAM_KEY].capacity.leave(
                exchange.slots, exchange.client_key, exchange.session_key
            )


def _busy(exchange: Exchange, busy: UpstreamBusy) -> web.Response:
    """503 `upstream_busy` (a body the browser may still be sending is not read: close)."""
    if busy.limit == "client":
        warn_if_clients_look_alike(exchange.request, exchange.settings.trusted_proxies)
    response = exchange.error(busy.status, busy.code, busy.message, headers=busy.headers)
    return _closing(response) if exchange.request.body_exists else response


def _closing(response: web.Response) -> web.Response:
    """`response`, with the connection closed after it: a refused request may leave an unread
    body (or an upgrade attempt) that must not be parsed as the next request."""
    response.force_close()
    return response


async def _proxy(exchange: Exchange) -> web.StreamResponse:
    request, app, lifecycle = exchange.request, exchange.app, exchange.lifecycle
    if is_websocket_upgrade(request.headers):
        return _closing(
            exchange.error(
                501,
                "websocket_not_supported",
                "WebSocket upgrades are not proxied; use HTTP (SSE).",
            )
        )
    if request.method in NEVER_PROXIED_METHODS:
        return _closing(
            exchange.error(
                405,
                "method_not_allowed",
                "This method is not proxied.",
                headers={"Allow": PROXIED_METHODS_ALLOW},
            )
        )
    if lifecycle.stop_streams.is_set():
        # Past the shutdown timeout: a stream started now would be cut at once. (Before it, a
        # last request on a kept-alive connection is still served, with `Connection: close`.)
        return _closing(
            exchange.error(
                503,
                "shutting_down",
                "This instance is shutting down; retry.",
                headers={"Retry-After": "1"},
            )
        )

    prefix = f"/apps/{app.app_id}/agent/"
    raw_path = request.rel_url.raw_path
    upstream = request.app[UPSTREAM_KEY]
    try:
        if not raw_path.startswith(prefix):
            raise InvalidPath("the path is not under the agent prefix")
        url = build_upstream_url(
            upstream.base_url(app), raw_path[len(prefix) :], request.rel_url.raw_query_string
        )
    except InvalidPath:
        return exchange.error(400, "invalid_path", "The agent path is not allowed.")
    if request.content_length is not None and request.content_length > app.max_body_bytes:
        return _closing(exchange.error(413, "body_too_large", "The request body is too large."))
    if not forwardable_headers(request.headers):
        return exchange.error(
            400, "invalid_header", "A request header has characters that cannot be forwarded."
        )

    # Upstream capacity (app/capacity.py): a slot of the application (and of the client
    # address) before the session is touched: a full limit is 503 at once and creates nothing.
    capacity = upstream.capacity
    slots = capacity.apps[app.app_id]
    client = client_key(request, exchange.settings.trusted_proxies) if slots.per_client else None
    try:
        capacity.enter(slots, client)
    except UpstreamBusy as busy:
        return _busy(exchange, busy)
    exchange.slots, exchange.client_key = slots, client

    # Load (and slide) the session; check the rate limits (before anything is created); mint
    # the conversation on the first agent request and save the session now, before the
    # upstream sees the id and before the response starts. `update_session` re-reads and
    # re-applies on a concurrent write, so racing first requests agree on one conversation.
    session = await get_session(request)
    await enforce_rate_limits(request, session)
    response = RelayResponse()
    exchange.response = response
    session = await update_session(request, response, ensure_conversation)
    conversation_id = ensure_conversation(session)  # already there: changes nothing
    session_id = session.identity
    if slots.per_session and isinstance(session_id, str):
        try:
            capacity.enter_session(slots, session_id)
        except UpstreamBusy as busy:
            return _busy(exchange, busy)
        exchange.session_key = session_id

    # A small body of declared length is read first and sent as bytes (its Content-Length is
    # forwarded): an async-generator upload costs a payload writer, a task step and a timer
    # per chunk. Reading it happens before the header timer starts, which is the same as that
    # timer being paused while the browser uploads; a stall is 408 as below.
    data: bytes | AsyncIterator[bytes] | None = None
    if request.body_exists:
        upload_timeout = app.upload_timeout_seconds or exchange.settings.upload_timeout_seconds
        exchange.upload_deadline = asyncio.get_running_loop().time() + upload_timeout
        length = request.content_length
        if length is not None and length <= SMALL_BODY_BYTES:
            try:
                data = exchange.arrived_body(app.max_body_bytes)
                if data is None:
                    async with contextlib.aclosing(exchange.body(app.max_body_bytes)) as chunks:
                        data = b"".join([chunk async for chunk in chunks])
            except BodyTooLarge:
                return _closing(
                    exchange.error(413, "body_too_large", "The request body is too large.")
                )
            except BodyStalled:
                return _body_stalled(exchange)
        else:
            data = exchange.body(app.max_body_bytes)

    timeout = app.connect_timeout_seconds
    sent = time.perf_counter()  # metrics: time to first byte
    try:
        async with asyncio.timeout(timeout) as deadline:
            exchange.header_deadline = deadline  # paused while the browser uploads
            try:
                upstream_response = await upstream.session.request(
                    request.method,
                    url,
                    headers=upstream_request_headers(
                        request, app, exchange.settings, conversation_id
                    ),
                    data=data,
                    allow_redirects=False,
                    timeout=request_timeout(timeout),
                )
            finally:
                exchange.header_deadline = None
    except (TimeoutError, aiohttp.ClientError, OSError) as err:
        if exchange.body_too_large:
            return _closing(exchange.error(413, "body_too_large", "The request body is too large."))
        if exchange.body_stalled:
            return _body_stalled(exchange)
        if isinstance(err, TimeoutError):
            log.warning(
                "upstream timeout: no response headers within %ss (app %s, request %s)",
                timeout,
                app.app_id,
                exchange.request_id,
            )
            record_upstream_error(request, "timeout")
            return exchange.error(
                504, "upstream_timeout", "The agent service did not answer in time."
            )
        if isinstance(err, aiohttp.ClientResponseError):
            # An answer that is not valid HTTP (status line, framing, header limits): the
            # upstream is broken, not unreachable.
            return _protocol_error(exchange, type(err).__name__)
        log.warning(
            "upstream unavailable: %s (app %s, request %s)",
            type(err).__name__,
            app.app_id,
            exchange.request_id,
        )
        record_upstream_error(request, "unavailable")
        return exchange.error(502, "upstream_unavailable", "The agent service is unavailable.")
    record_upstream_first_byte(request, sent)

    if has_invalid_header(upstream_response):
        upstream_response.close()
        return _protocol_error(exchange, "control character in a response header")
    if not RELAYED_STATUSES[0] <= upstream_response.status <= RELAYED_STATUSES[1]:
        # 101 would make the proxy in front a raw tunnel to this server (docs/security.md);
        # aiohttp's client consumes the other 1xx itself. Never relayed, nor above 599.
        upstream_response.close()
        return _protocol_error(exchange, f"status {upstream_response.status}")
    status = upstream_response.status
    if (
        300 <= status < 400
        and status != 304
        and redirect_leaves_application(
            upstream_response.headers.getall("Location", []), request, app, exchange.settings
        )
    ):
        upstream_response.close()
        log.warning(
            "upstream redirect outside its application refused (app %s, request %s)",
            app.app_id,
            exchange.request_id,
        )
        record_upstream_error(request, "protocol_error")
        return exchange.error(
            502,
            "upstream_redirect_not_allowed",
            "The agent service redirected to another part of this site.",
        )
    if upstream_response.headers.get(ROTATE_HEADER, "").strip() == "1":
        # The upstream asks for a new session id (e.g. after a login step behind the agent):
        # rotate before the browser sees any of the answer; the old id is dead before then.
        try:
            await rotate_session(request, response)
        except (StoreUnavailable, ApiError) as err:
            upstream_response.close()
            # Through `exchange.error`, which keeps the cookie already set on `response`: when
            # this request created the session, that session still exists (the rotated copy
            # was removed) and the browser must learn its id, or the key would be orphaned.
            if isinstance(err, StoreUnavailable):
                log.warning("session store unavailable during a rotation: %s", err)
                err = store_full() if isinstance(err, StoreFull) else store_unavailable()
            return exchange.error(err.status, err.code, err.message, headers=err.headers)
        except BaseException:
            upstream_response.close()
            raise
    if (
        app.resumable
        and upstream_response.status == 200
        and is_event_stream(upstream_response.headers)
    ):
        # Resumable applications (app/runs/): the event stream becomes a run that outlives
        # this request; None when the run store failed (then relayed as below, no resume).
        started = await start_run(exchange, response, upstream_response, conversation_id)
        if started is not None:
            return started
    try:
        await relay(exchange, response, upstream_response, upstream.stop)
    finally:
        # After a complete body this only returns the connection to the pool; otherwise it
        # closes it, which is how the upstream learns the request was abandoned.
        if upstream_response.content.at_eof() and not exchange.client_gone:
            upstream_response.release()
        else:
            upstream_response.close()
    return response


def _body_stalled(exchange: Exchange) -> web.Response:
    log.info(
        "browser body paused for %ss or not complete by its upload deadline (app %s, request %s)",
        exchange.settings.body_timeout_seconds,
        exchange.app.app_id,
        exchange.request_id,
    )
    return _closing(exchange.error(408, "body_timeout", "The request body did not arrive in time."))


def _protocol_error(exchange: Exchange, detail: str) -> web.Response:
    log.warning(
        "upstream protocol error: %s (app %s, request %s)",
        detail,
        exchange.app.app_id,
        exchange.request_id,
    )
    record_upstream_error(exchange.request, "protocol_error")
    return exchange.error(
        502, "upstream_protocol_error", "The agent service sent an invalid response."
    )
