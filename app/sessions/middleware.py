"""Session middleware that also saves on streaming responses.

aiohttp-session's own middleware silently skips anything that is not a plain `web.Response`,
and a prepared response can no longer take a cookie. Here the session is saved after the
handler for ordinary responses, and streaming handlers call `commit_session` before
`prepare()`, so the session, its cookie and its TTL refresh are never lost on a stream.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp_session import Session

from app.errors import ApiError, error_response
from app.sessions.storage import GatewayStorage, SessionEnded, SessionTooLarge
from app.state import STORAGE_APP_KEY

log = logging.getLogger(__name__)

STORAGE_KEY = web.RequestKey("session_storage", GatewayStorage)
SESSION_KEY = web.RequestKey("session", Session)


async def get_session(request: web.Request) -> Session:
    """The request's session, loaded (and slid) once on first use."""
    session = request.get(SESSION_KEY)
    if session is None:
        session = await request[STORAGE_KEY].load_session(request)
        request[SESSION_KEY] = session
    return session


def peek_session(request: web.Request) -> Session | None:
    """The session if this request already loaded it."""
    return request.get(SESSION_KEY)


async def commit_session(request: web.Request, response: web.StreamResponse) -> None:
    """Save the session now if it changed (call before `prepare()` on a stream).

    Raises `ApiError` 413 (too large, nothing written) or 409 (deleted meanwhile), and
    `StoreUnavailable`.
    """
    session = request.get(SESSION_KEY)
    if session is None or not session._changed:
        return
    storage = request[STORAGE_KEY]
    try:
        await storage.save_session(request, response, session)
    except SessionTooLarge as err:
        raise ApiError(413, "session_too_large", str(err)) from err
    session._changed = False


def setup_sessions() -> Middleware:
    """The session middleware; the storage comes from the app (created in its store context)."""

    @web.middleware
    async def session_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        storage = request.app[STORAGE_APP_KEY]
        request[STORAGE_KEY] = storage
        try:
            response = await handler(request)
            if not response.prepared:
                await commit_session(request, response)
            elif (session := request.get(SESSION_KEY)) is not None and session._changed:
                log.error("session changed after the response started; not saved: %s", request.path)
            return response
        except SessionEnded:
            response = error_response(
                request, 409, "session_ended", "The session ended (logged out) meanwhile."
            )
            storage.expire_cookie(request, response)
            return response

    return session_middleware
