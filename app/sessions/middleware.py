"""The session step of the gateway middleware (saves on streaming responses too), and the
update helpers.

aiohttp-session's own middleware silently skips anything that is not a plain `web.Response`,
and a prepared response can no longer take a cookie. Here the session is saved after the
handler for ordinary responses (`finish_session`, run by `app.middlewares.setup_gateway`),
and streaming handlers call `commit_session` (or
`update_session`) before `prepare()`, so the session, its cookie and its TTL refresh are never
lost on a stream.

No lost updates: a save is a compare-and-set on the revision the session was loaded at.
`update_session(request, response, mutate)` applies `mutate` to the session and saves it; when
another request (another replica) wrote in between, it re-reads the session and applies
`mutate` again, up to `CAS_ATTEMPTS` times, then answers 409 `session_conflict`. A handler that
changes the session without it gets 409 `session_conflict` on a lost race (nothing written).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from aiohttp import web

from app.errors import ApiError, error_response
from app.keys import CREATION_GATE_KEY, SESSION_KEY, STORAGE_KEY
from app.sessions.codec import SessionTooLarge
from app.sessions.conflicts import SessionConflict, SessionEnded, SessionRotated
from app.sessions.storage import SessionStorage
from app.sessions.stored_session import StoredSession

log = logging.getLogger(__name__)

# Attempts of one update under contention (each: one read, one compare-and-set), and the
# random pause before a retry (up to CAS_JITTER_SECONDS x the attempt number), so requests
# that lost together do not collide again in lockstep.
CAS_ATTEMPTS = 5
CAS_JITTER_SECONDS = 0.005

# Awaited before a new session is first stored (`commit_session`); it may raise `ApiError`
# (429: too many new sessions from this client, app/creation_limit.py) so nothing is created.
SessionCreationGate = Callable[[web.Request], Awaitable[None]]


def _conflict() -> ApiError:
    return ApiError(
        409,
        "session_conflict",
        "The session kept changing under concurrent requests; retry.",
        headers={"Retry-After": "1"},
    )


async def get_session(request: web.Request) -> StoredSession:
    """The request's session, loaded (and slid) once on first use (what
    `aiohttp_session.get_session` does, on the gateway's typed keys)."""
    session = request.get(SESSION_KEY)
    if session is None:
        loaded = await request[STORAGE_KEY].load_session(request)
        assert isinstance(loaded, StoredSession)
        request[SESSION_KEY] = session = loaded
    return session


def storage_of(request: web.Request) -> SessionStorage:
    return request[STORAGE_KEY]


async def reload_session(request: web.Request) -> StoredSession:
    """Read the session again (after a lost compare-and-set), replacing the request's copy."""
    session = await storage_of(request).load_session(request)
    assert isinstance(session, StoredSession)
    request[SESSION_KEY] = session
    return session


async def commit_session(request: web.Request, response: web.StreamResponse) -> None:
    """Save the session now if it changed (call before `prepare()` on a stream).

    A new session passes the creation gate first (`CREATION_GATE_KEY`, if set).
    Raises `ApiError` 413 (too large, nothing written) or 429 (too many new sessions from this
    client, nothing written), `SessionConflict` (changed by another
    request meanwhile, nothing written), `SessionEnded` (deleted meanwhile) and
    `StoreUnavailable`.
    """
    session = request.get(SESSION_KEY)
    if session is None or not session.modified:
        return
    if session.new and not session.stored and (not session.empty or session.meta):
        gate = request.app.get(CREATION_GATE_KEY)
        if gate is not None:
            await gate(request)
    try:
        await storage_of(request).save_session(request, response, session)
    except SessionTooLarge as err:
        raise ApiError(413, "session_too_large", str(err)) from err


async def update_session(
    request: web.Request,
    response: web.StreamResponse,
    mutate: Callable[[StoredSession], object],
) -> StoredSession:
    """Apply `mutate` to the session and save it if that changed it; on a concurrent write,
    re-read and re-apply (bounded). Returns the saved session.

    `mutate` must be a pure function of the session's current content (it may run several
    times). Raises `ApiError` 409 `session_conflict` after `CAS_ATTEMPTS` lost races, and
    whatever `commit_session` raises.
    """
    session = await get_session(request)
    existed = session.stored
    for attempt in range(1, CAS_ATTEMPTS + 1):
        mutate(session)
        try:
            await commit_session(request, response)
            return session
        except SessionConflict:
            if attempt == CAS_ATTEMPTS:
                break
            await asyncio.sleep(random.uniform(0, CAS_JITTER_SECONDS * attempt))
            session = await reload_session(request)
            if existed and not session.stored:
                raise SessionEnded() from None
    raise _conflict()


async def rotate_session(request: web.Request, response: web.StreamResponse) -> StoredSession:
    """Give the request's session a new id (cookie set on `response`); the old id is dead
    when this returns. Pending changes are saved first. Without a stored session nothing
    happens (the next write mints a fresh id anyway).

    Raises `SessionEnded` (the session is gone), `ApiError` 409 after `CAS_ATTEMPTS` lost races,
    `StoreUnavailable` (the old id then stays valid unless its delete went through).
    """
    session = await get_session(request)
    await commit_session(request, response)
    storage = storage_of(request)
    for attempt in range(1, CAS_ATTEMPTS + 1):
        if not session.stored or session.identity is None:
            return session
        moved = await storage.rotate(request, response, session)
        if moved is not None:
            request[SESSION_KEY] = moved
            return moved
        if attempt == CAS_ATTEMPTS:
            break
        await asyncio.sleep(random.uniform(0, CAS_JITTER_SECONDS * attempt))
        session = await reload_session(request)
        if not session.stored:
            raise SessionEnded()
    raise _conflict()


async def finish_session(request: web.Request, response: web.StreamResponse) -> None:
    """After the handler (the gateway middleware's session step): save the session on a
    response not yet started (raises as `commit_session`); on a started stream a change can no
    longer be saved, which is logged."""
    session = request.get(SESSION_KEY)
    if session is None or not session.modified:
        return
    if not response.prepared:
        await commit_session(request, response)
    else:
        log.error("session changed after the response started; not saved: %s", request.path)


def session_error_response(
    request: web.Request, storage: SessionStorage, exc: SessionEnded | SessionConflict
) -> web.Response:
    """The answer to a request whose session ended (409 `session_ended`, cookie expired), was
    rotated away (409 `session_rotated`, cookie untouched: the browser already holds the new
    one) or kept changing under it (409 `session_conflict`): the storage's own answers, in the
    gateway's envelope (with the request id)."""
    if isinstance(exc, SessionRotated):
        return error_response(request, 409, exc.code, exc.message)
    if isinstance(exc, SessionEnded):
        response = error_response(
            request, 409, "session_ended", "The session ended (logged out) meanwhile."
        )
        storage.expire_cookie(request, response)
        return response
    conflict = _conflict()
    return error_response(
        request, conflict.status, conflict.code, conflict.message, headers=conflict.headers
    )
