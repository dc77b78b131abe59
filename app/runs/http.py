"""Runs over HTTP: the resume and stop endpoints (the first response, the agent request
that starts a run: app/runs/start.py).

- `GET /apps/{applicationId}/runs/{runId}` on any replica, with `Last-Event-ID: <seq>` (what
  `EventSource` sends on its own) or `?last_event_id=<seq>` (none: from the start): the events
  after `<seq>` (replayed from the log or Redis), then the live ones, then the end (the
  response ends). Every event exactly once, in order. A run of another session (or of another
  application, or unknown, or expired): 404 `run_not_found`. A malformed id: 400
  `invalid_last_event_id`. A run that ended with nothing after `<seq>`: 204 (`EventSource`
  stops reconnecting). Events before `<seq>` dropped by the run's limits: one `event: error`
  `resume_too_old`. A pumping replica that died (heartbeat gone, no end recorded):
  `event: error` `run_orphaned` within 4 heartbeats plus one. A reader limit full
  (app/runs/readers.py): 503 `upstream_busy` with `Retry-After: 1`, before the stream starts.
- `POST /apps/{applicationId}/runs/{runId}/stop` (CSRF header, same session): 202; the pump,
  wherever it runs, ends the run (`run_stopped`) within a heartbeat and cancels the upstream.

Every answer of both (streams, 204, 202, JSON errors) carries `PROXIED_RESPONSE_HEADERS` (the
sandbox CSP, `nosniff`), as every proxied answer does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from app.capacity import client_key
from app.errors import ApiError, store_error
from app.keys import APP_CONFIG_KEY, RUNS_KEY, SETTINGS_KEY
from app.proxy.headers import PROXIED_RESPONSE_HEADERS
from app.runs.catchup import turn_of
from app.runs.feed import follow_local, follow_remote
from app.runs.readers import Follower, FollowTiming
from app.runs.run import CUT_REASON, error_event, owner_of
from app.runs.runs import RunRegistry, reading
from app.runs.store import RedisRunStore, RunMeta
from app.sessions.backend import StoreUnavailable
from app.sessions.middleware import get_session

log = logging.getLogger(__name__)

RUN_HEADER = "X-Run-Id"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")
_SEQ_RE = re.compile(r"^[0-9]{1,18}$")


def stream_headers(response: web.StreamResponse, run_id: str) -> None:
    response.headers[RUN_HEADER] = run_id
    response.headers["X-Accel-Buffering"] = "no"
    response.headers.setdefault("Cache-Control", "no-cache")


def _run_id(request: web.Request) -> str:
    run_id = request.match_info["runId"]
    if not _RUN_ID_RE.match(run_id):
        raise _not_found()
    return run_id


def _not_found() -> ApiError:
    return ApiError(404, "run_not_found", "No such run in this session.")


def _last_event_id(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.query.get("last_event_id")
    if raw is None or raw.strip() == "":
        return 0
    raw = raw.strip()
    if not _SEQ_RE.match(raw):
        raise ApiError(
            400,
            "invalid_last_event_id",
            "Last-Event-ID (or last_event_id) must be the id of an event of this run.",
        )
    return int(raw)


async def _owner(request: web.Request) -> str | None:
    """The owner hash of the request's session (None without a conversation)."""
    session = await get_session(request)
    conversation = session.meta.get("conversation_id")
    return owner_of(conversation) if isinstance(conversation, str) else None


def sandboxed(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """`handler`'s answers, its JSON errors included, carry the headers of every proxied
    answer (`PROXIED_RESPONSE_HEADERS`: the sandbox CSP, `nosniff`): a run's events are the
    upstream's bytes, served from the origin every application shares."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except ApiError as err:
            err.headers.update(PROXIED_RESPONSE_HEADERS)
            raise
        except StoreUnavailable as err:
            log.warning("session store unavailable: %s", err)
            error = store_error(err)
            error.headers.update(PROXIED_RESPONSE_HEADERS)
            raise error from err
        if not response.prepared:
            response.headers.update(PROXIED_RESPONSE_HEADERS)
        return response

    return wrapped


@sandboxed
async def resume_run(request: web.Request) -> web.StreamResponse:
    """`GET /apps/{applicationId}/runs/{runId}` (see the module docstring)."""
    app = request[APP_CONFIG_KEY]
    run_id = _run_id(request)
    after = _last_event_id(request)
    owner = await _owner(request)
    registry = request.app[RUNS_KEY]
    run = registry.runs.get(run_id)
    if owner is None or not app.resumable:  # (a replica configured otherwise)
        raise _not_found()
    caps = registry.readers
    # A client of the reader caps: an IPv4 address, an IPv6 one by its /48 (a /56 is what
    # one home gets: its /64s held a whole application's follow share, attack-10).
    client = turn_of(client_key(request, request.app[SETTINGS_KEY].trusted_proxies))
    if run is not None:
        if run.owner != owner or run.app.app_id != app.app_id:
            raise _not_found()
        if after >= run.log.next_seq:
            raise _past_the_end()
        if run.log.end is not None and after == run.log.next_seq - 1:
            return web.Response(status=204)
        caps.enter(app.app_id, run_id, client)  # 503 `upstream_busy` when full
        try:
            registry.counters.resumes += 1
            response = _event_stream_response(run_id)
            with reading(run):
                await follow_local(request, response, run, after, registry, resume=True)
        finally:
            caps.leave(app.app_id, run_id, client)
        return response
    store = registry.store
    if store is None:
        raise _not_found()
    meta = await store.meta(run_id)
    if meta is None or meta.owner != owner or meta.app_id != app.app_id:
        raise _not_found()
    if meta.end == CUT_REASON and after >= meta.last_seq:
        # Cut over its budget: Redis ends at its cut (`last_seq`, the error's place), but its
        # browser got more from the replica running it. Past the cut, this replica can only
        # say so (a 204 there made EventSource stop and lose the rest silently: attack-12).
        return await _cut_answer(request, run_id)
    # Only an ended run's last id is final: a live run's events reach its browser before
    # they reach Redis, so a browser resuming at once may have seen more than Redis holds.
    if meta.end is not None and after > meta.last_seq:
        raise _past_the_end()
    if meta.end is not None and after == meta.last_seq:
        return web.Response(status=204)
    caps.enter(app.app_id, run_id, client)
    try:
        return await _resume_remote(request, registry, store, run_id, after, meta, client)
    finally:
        caps.leave(app.app_id, run_id, client)


async def _cut_answer(request: web.Request, run_id: str) -> web.StreamResponse:
    """An event stream of the one `event: error` `run_over_budget` (no `id:`), then its end."""
    response = _event_stream_response(run_id)
    await response.prepare(request)
    await response.write_eof(error_event(CUT_REASON, run_id) + b"\n\n")
    return response


async def _resume_remote(
    request: web.Request,
    registry: RunRegistry,
    store: RedisRunStore,
    run_id: str,
    after: int,
    meta: RunMeta,
    client: str,
) -> web.StreamResponse:
    """A resume of a run pumped elsewhere (or ended), its reader counted: through the run's
    follower here (shared; a new one when none follows it yet, 503 when the application or
    the client may not follow one more), or, ended, from `XRANGE` alone."""
    app = request[APP_CONFIG_KEY]
    window_ms = round(app.resume_window_seconds * 1000)
    follower: Follower | None = None
    if meta.end is None:
        settings = request.app[SETTINGS_KEY]

        def start(release: Callable[[], None]) -> Follower:
            return Follower(
                store,
                run_id,
                after,
                app_id=app.app_id,
                client=client,
                timing=FollowTiming(
                    heartbeat=registry.heartbeat,
                    window_ms=window_ms,
                    retry_seconds=2 * settings.redis_op_timeout_seconds,
                    max_bytes=app.resume_max_bytes,
                ),
                release=release,
            )

        follower = registry.readers.follower(app.app_id, run_id, client, start)
        # Counted before any await: the follower's task has not run yet (no reader: it ends).
        follower.readers += 1
    try:
        registry.counters.resumes += 1
        response = _event_stream_response(run_id)
        await response.prepare(request)
        await follow_remote(
            request, response, store, run_id, after, registry, follower, meta.last_seq, client
        )
        return response
    finally:
        if follower is not None:
            follower.readers -= 1


def _past_the_end() -> ApiError:
    return ApiError(400, "invalid_last_event_id", "Last-Event-ID is past this run's last event.")


def _event_stream_response(run_id: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    response.headers.extend(PROXIED_RESPONSE_HEADERS)
    stream_headers(response, run_id)
    return response


@sandboxed
async def stop_run(request: web.Request) -> web.Response:
    """`POST /apps/{applicationId}/runs/{runId}/stop` (see the module docstring)."""
    app = request[APP_CONFIG_KEY]
    run_id = _run_id(request)
    owner = await _owner(request)
    registry = request.app[RUNS_KEY]
    if owner is None:
        raise _not_found()
    run = registry.runs.get(run_id)
    state = "stopping"
    if run is not None:
        if run.owner != owner or run.app.app_id != app.app_id:
            raise _not_found()
        if run.log.end is None:
            registry.stop_local(run)
        else:
            state = "ended"
    elif registry.store is not None:
        meta = await registry.store.meta(run_id)
        if meta is None or meta.owner != owner or meta.app_id != app.app_id:
            raise _not_found()
        # A run cut over its budget has an end in Redis but may pump on where it runs
        # (attack-12): its flag is set until its finish is recorded, and it is `stopping`
        # while its heartbeat key lives (that finish lost, attack-14, or its replica dead:
        # `ended`; a stalled replica reads the flag when it wakes, attack-15).
        # So is a live run whose heartbeat key is gone: its replica died (a resume gets
        # `run_orphaned`) or stalls (it reads the flag when it wakes; attack-16).
        pumping = meta.end is None or (meta.end == CUT_REASON and not meta.finished)
        if not pumping or not await registry.store.request_stop(run_id):
            state = "ended"
    else:
        raise _not_found()
    return web.json_response(
        {"run": {"id": run_id, "state": state}},
        status=202,
        headers={"Cache-Control": "no-store"},
    )
