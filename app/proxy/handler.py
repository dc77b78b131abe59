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
from collections.abc import AsyncIterator

from aiohttp import web

from app.capacity import UpstreamBusy, client_key, warn_if_clients_look_alike
from app.errors import ApiError, BodyTimeout, BodyTooLarge, error_response, store_error
from app.keys import APP_CONFIG_KEY, LIFECYCLE_KEY, SETTINGS_KEY, UPSTREAM_KEY
from app.proxy.call import UpstreamCall
from app.proxy.errors import (
    InvalidHeader,
    InvalidPath,
    MethodNotProxied,
    ShuttingDown,
    WebSocketNotSupported,
)
from app.proxy.exchange import Exchange
from app.proxy.fastread import relay_response
from app.proxy.headers import (
    ROTATE_HEADER,
    forwardable_headers,
    is_event_stream,
    is_websocket_upgrade,
)
from app.proxy.relay import relay
from app.proxy.urls import build_upstream_url
from app.proxy.watch import DisconnectWatch
from app.ratelimit import enforce_rate_limits
from app.runs.start import start_run
from app.sessions.backend import StoreUnavailable
from app.sessions.middleware import get_session, rotate_session, update_session
from app.sessions.stored_session import StoredSession

log = logging.getLogger(__name__)

CONVERSATION_FIELD = "conversation_id"
_CONVERSATION_RE = re.compile(r"^[A-Za-z0-9_-]{22,86}$")
# Request bodies up to this declared length are read whole, then sent upstream as bytes.
SMALL_BODY_BYTES = 64 * 1024

# Methods never sent upstream (405): TRACE/TRACK make an upstream echo the request it received,
# the application's configured credential headers included; CONNECT asks for a tunnel.
NEVER_PROXIED_METHODS = frozenset({"TRACE", "TRACK", "CONNECT"})
# Refusals that may leave an unread body (or an upgrade attempt) on the connection: it is
# closed after the answer, so that is never parsed as the next request. `UpstreamBusy` too,
# when the request has a body.
_CLOSING = (WebSocketNotSupported, MethodNotProxied, ShuttingDown, BodyTooLarge, BodyTimeout)


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
    """`_proxy`, its errors rendered (`render`), then the upstream slots it took are
    returned, however it ended (the upstream answer is released or closed by then)."""
    try:
        return await _proxy(exchange)
    except (ApiError, StoreUnavailable) as err:
        return render(exchange, err)
    finally:
        if exchange.slots is not None:
            exchange.request.app[UPSTREAM_KEY].capacity.leave(
                exchange.slots, exchange.client_key, exchange.session_key
            )


def render(exchange: Exchange, err: ApiError | StoreUnavailable) -> web.Response:
    """The one place the proxy's refusals become answers: the JSON envelope, carrying any
    session cookie already set on the relay response (a session created or rotated by this
    request must reach the browser, or its key would be orphaned), and `Connection: close`
    where a body may be left unread (`_CLOSING`, `UpstreamBusy` with a body)."""
    request = exchange.request
    if isinstance(err, StoreUnavailable):
        log.warning("session store unavailable: %s", err)
        err = store_error(err)
    response = error_response(request, err.status, err.code, err.message, headers=err.headers)
    if exchange.response is not None:
        for name, morsel in exchange.response.cookies.items():
            response.cookies[name] = morsel
    if isinstance(err, _CLOSING) or (isinstance(err, UpstreamBusy) and request.body_exists):
        response.force_close()
    return response


async def _proxy(exchange: Exchange) -> web.StreamResponse:
    request, app = exchange.request, exchange.app
    if is_websocket_upgrade(request.headers):
        raise WebSocketNotSupported()
    if request.method in NEVER_PROXIED_METHODS:
        raise MethodNotProxied()
    if exchange.lifecycle.stop_streams.is_set():
        # Past the shutdown timeout: a stream started now would be cut at once. (Before it, a
        # last request on a kept-alive connection is still served, with `Connection: close`.)
        raise ShuttingDown()
    prefix = f"/apps/{app.app_id}/agent/"
    raw_path = request.rel_url.raw_path
    if not raw_path.startswith(prefix):
        raise InvalidPath("the path is not under the agent prefix")
    upstream = request.app[UPSTREAM_KEY]
    url = build_upstream_url(
        upstream.base_url(app), raw_path[len(prefix) :], request.rel_url.raw_query_string
    )
    if request.content_length is not None and request.content_length > app.max_body_bytes:
        raise BodyTooLarge()
    if not forwardable_headers(request.headers):
        raise InvalidHeader()

    # Upstream capacity (app/capacity.py): a slot of the application (and of the client
    # address) before the session is touched: a full limit is 503 at once and creates nothing.
    capacity = upstream.capacity
    slots = capacity.apps[app.app_id]
    client = client_key(request, exchange.settings.trusted_proxies) if slots.per_client else None
    try:
        capacity.enter(slots, client)
    except UpstreamBusy as busy:
        if busy.limit == "client":
            warn_if_clients_look_alike(request, exchange.settings.trusted_proxies)
        raise
    exchange.slots, exchange.client_key = slots, client

    # Load (and slide) the session; check the rate limits (before anything is created); mint
    # the conversation on the first agent request and save the session now, before the
    # upstream sees the id and before the response starts. `update_session` re-reads and
    # re-applies on a concurrent write, so racing first requests agree on one conversation.
    session = await get_session(request)
    await enforce_rate_limits(request, session)
    response = relay_response()
    exchange.response = response
    session = await update_session(request, response, ensure_conversation)
    conversation_id = ensure_conversation(session)  # already there: changes nothing
    session_id = session.identity
    if slots.per_session and isinstance(session_id, str):
        capacity.enter_session(slots, session_id)
        exchange.session_key = session_id

    call = UpstreamCall(exchange, url, await _upload(exchange), conversation_id)
    async with call as answer:
        if answer.headers.get(ROTATE_HEADER, "").strip() == "1":
            # The upstream asks for a new session id (e.g. after a login step behind the
            # agent): rotate before the browser sees any of the answer; the old id is dead
            # before then. A failure is rendered with the cookie already set (`render`).
            try:
                await rotate_session(request, response)
            except BaseException:
                answer.close()
                raise
        if app.resumable and answer.status == 200 and is_event_stream(answer.headers):
            # Resumable applications (app/runs/): the event stream becomes a run that outlives
            # this request; None when the run store failed (then relayed as below, no resume).
            call.hand_over()  # to `start_run`: it closes the answer on failure, a run keeps it
            started = await start_run(exchange, response, answer, conversation_id)
            if started is not None:
                return started
            call.take_back()  # no run (the run store failed): relayed as usual
        await relay(exchange, response, answer, upstream.stop)
    return response


async def _upload(exchange: Exchange) -> bytes | AsyncIterator[bytes] | None:
    """What is sent upstream as the body: None without one; the bytes of a small body of
    declared length (read first and sent with its Content-Length: an async-generator upload
    costs a payload writer, a task step and a timer per chunk; reading it happens before the
    header timer starts, which is the same as that timer being paused while the browser
    uploads); else the body streamed (`Exchange.body`). Raises `BodyTooLarge`, `BodyTimeout`.
    """
    request, app = exchange.request, exchange.app
    if not request.body_exists:
        return None
    upload_timeout = app.upload_timeout_seconds or exchange.settings.upload_timeout_seconds
    exchange.upload_deadline = asyncio.get_running_loop().time() + upload_timeout
    length = request.content_length
    if length is None or length > SMALL_BODY_BYTES:
        return exchange.body(app.max_body_bytes)
    data = exchange.arrived_body(app.max_body_bytes)
    if data is None:
        async with contextlib.aclosing(exchange.body(app.max_body_bytes)) as chunks:
            data = b"".join([chunk async for chunk in chunks])
    return data
