"""The proxy's hook that turns a resumable application's agent event stream into a run
(`start_run`; the resume and stop endpoints: app/runs/http.py).

The first response (the agent request itself): `X-Run-Id: <id>` among the upstream's headers,
then the run's events, each carrying `id: <seq>`, as the pump appends them (or all at once for
a run created ended: its whole answer had arrived, `RunRegistry.start_ended`). No run, and the
answer relayed as usual (no resume), when the client is over `resume_runs_per_client`, the
application over `resume_redis_budget_bytes`, or the run store failed.
"""

from __future__ import annotations

import logging
import math
import secrets
import sys
import time

import aiohttp
from aiohttp import web

from app.capacity import client_key
from app.keys import RUNS_KEY, SETTINGS_KEY, STORAGE_APP_KEY, UPSTREAM_KEY
from app.proxy.exchange import Exchange
from app.proxy.fastread import take_buffered
from app.proxy.headers import browser_response_headers
from app.ratelimit import token_bucket
from app.runs.catchup import turn_of
from app.runs.feed import follow_local, write_pieces
from app.runs.http import stream_headers
from app.runs.run import owner_of
from app.runs.store import RunMeta
from app.sessions.backend import StoreUnavailable

log = logging.getLogger(__name__)


_OVER_BUDGET_LOG_SECONDS = 10.0
_last_over_budget_log: dict[str, float] = {}


def _log_over_budget(app_id: str, used: int) -> None:
    """Say (at most every `_OVER_BUDGET_LOG_SECONDS` per application) that runs are relayed
    without resume because the application's ended runs hold its Redis budget."""
    now = time.monotonic()
    if now - _last_over_budget_log.get(app_id, -math.inf) >= _OVER_BUDGET_LOG_SECONDS:
        _last_over_budget_log[app_id] = now
        log.warning(
            "app %s: its ended runs hold %d bytes in Redis (resume_redis_budget_bytes): new "
            "runs relayed without resume",
            app_id,
            used,
        )


async def _client_may_start(exchange: Exchange) -> bool:
    """Whether the request's client address is within its application's
    `resume_runs_per_client` (a GCRA bucket in the session store, shared by the replicas on
    Redis: `{REDIS_AUX_PREFIX}rl:{<applicationId>}:runs:<address>`); takes one token if so.
    `StoreUnavailable` propagates (the caller relays without resume)."""
    rate = exchange.app.resume_runs_per_client
    if rate is None:
        return True
    request = exchange.request
    settings = request.app[SETTINGS_KEY]
    address = turn_of(exchange.client_key or client_key(request, settings.trusted_proxies))
    key = f"{settings.redis_aux_prefix}rl:{{{exchange.app.app_id}}}:runs:{address}"
    store = request.app[STORAGE_APP_KEY].backend
    wait = await store.rate_limit([token_bucket(key, rate)])
    return wait <= 0


async def start_run(
    exchange: Exchange,
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    conversation_id: str,
) -> web.StreamResponse | None:
    """The proxy's hook for an event stream of a resumable application: start a run, answer
    with it; None when the run store failed or the application's runs are over their Redis
    budget (`resume_redis_budget_bytes`): the proxy then relays as usual, no resume."""
    request, app = exchange.request, exchange.app
    registry = request.app[RUNS_KEY]
    run_id = secrets.token_urlsafe(16)
    owner = owner_of(conversation_id)
    reserved = 0
    body = b""  # the upstream's body, when it had all arrived (taken from it)
    try:
        if not await _client_may_start(exchange):
            registry.counters.unresumable += 1
            registry.counters.rate_limited += 1
            return None
        if registry.store is not None:
            admitted, used, reserved = await registry.budget.admit(
                registry.store,
                app.app_id,
                window_ms=round(app.resume_window_seconds * 1000),
                budget=app.resume_redis_budget_bytes,
            )
            if not admitted:
                registry.counters.unresumable += 1
                registry.counters.over_budget += 1
                _log_over_budget(app.app_id, used)
                return None
            if upstream.content.is_eof():  # the whole answer is here already
                body = take_buffered(upstream.content, sys.maxsize)
                held, reserved = reserved, 0  # `start_ended` settles it, unless it declines
                ended = await registry.start_ended(run_id, app, owner, body, reserved=held)
                reserved = held
                if ended is not None:
                    upstream.release()
                    return await _answer_ended(exchange, response, upstream, run_id, ended)
            await registry.store.create(
                run_id,
                RunMeta(owner, app.app_id),
                ttl_ms=registry.ttl_ms(app),
                heartbeat_ms=registry.heartbeat_ms,
                window_ms=round(app.resume_window_seconds * 1000),
            )
    except StoreUnavailable as err:
        registry.budget.release(app.app_id, reserved)
        registry.counters.unresumable += 1
        log.warning("run not created (%s): relayed without resume (app %s)", err, app.app_id)
        exchange.taken = body
        return None
    except BaseException:
        registry.budget.release(app.app_id, reserved)
        upstream.close()
        raise
    # From here the pump owns the upstream response and the capacity slots (released once,
    # when the run ends, not when this request does).
    slots, client, session_key = exchange.slots, exchange.client_key, exchange.session_key
    exchange.slots = None
    capacity = request.app[UPSTREAM_KEY].capacity

    def release() -> None:
        if slots is not None:
            capacity.leave(slots, client, session_key)

    run = registry.start(run_id, app, owner, upstream, release, reserved=reserved, first=body)
    _run_headers(exchange, response, upstream, run_id)
    try:
        await follow_local(request, response, run, 0, registry)
    finally:
        run.local_readers -= 1  # `registry.start` counted this request as its first reader
    return response


async def _answer_ended(
    exchange: Exchange,
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    run_id: str,
    framed: bytes,
) -> web.StreamResponse:
    """The answer of a run created ended (`RunRegistry.start_ended`): its capacity slots go
    back at once, its events (`framed`) and the end of the response go out with the head
    (what `follow_local` sends for a run that has ended, without its waits)."""
    request = exchange.request
    slots, exchange.slots = exchange.slots, None
    if slots is not None:
        request.app[UPSTREAM_KEY].capacity.leave(slots, exchange.client_key, exchange.session_key)
    _run_headers(exchange, response, upstream, run_id)
    try:
        await response.prepare(request)
        await write_pieces(response, [framed], eof=True)
    except ConnectionError:
        pass  # the browser left: the run stays readable for its window
    return response


def _run_headers(
    exchange: Exchange,
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    run_id: str,
) -> None:
    """The head of a run's first response: the upstream's headers as relayed, no length, and
    the run's id."""
    response.set_status(200)
    headers = browser_response_headers(upstream.headers, exchange.app.relay)
    headers.popall("Content-Length", None)
    response.headers.extend(headers)
    stream_headers(response, run_id)
