"""Thin handlers for health, readiness and the browser-visible session API."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from app.errors import ApiError, BodyTimeout, BodyTooLarge
from app.keys import BACKEND_KEY, LIFECYCLE_KEY, SESSION_KEY, SETTINGS_KEY
from app.sessions.backend import StoreUnavailable
from app.sessions.middleware import (
    commit_session,
    get_session,
    rotate_session,
    storage_of,
    update_session,
)
from app.sessions.stored_session import StoredSession

NO_STORE = {"Cache-Control": "no-store"}
# The headers `web.json_response(..., headers=NO_STORE)` ends up with, built once: a response
# made from them and a `bytes` body skips aiohttp's content-type and charset handling.
_JSON_NO_STORE = CIMultiDictProxy(
    CIMultiDict({"Cache-Control": "no-store", "Content-Type": "application/json; charset=utf-8"})
)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Touches nothing."""
    return web.json_response({"status": "ok"}, headers=NO_STORE)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 when the store answers and the process is not shutting down."""
    if request.app[LIFECYCLE_KEY].shutting_down:
        return web.json_response({"status": "shutting_down"}, status=503, headers=NO_STORE)
    try:
        await request.app[BACKEND_KEY].ping()
    except StoreUnavailable:
        return web.json_response(
            {"status": "session_store_unavailable"}, status=503, headers=NO_STORE
        )
    return web.json_response({"status": "ready"}, headers=NO_STORE)


# The session API's `data` document is the session's own mapping (every key the browser
# PATCHed); the gateway's fields (conversation id, created_at) live beside it in the store.


def _data_body(session: StoredSession) -> bytes:
    """`{"data": ...}` of `session` as JSON bytes (what `json.dumps` writes); for a session
    unchanged since it was loaded, the mapping is encoded once per stored value
    (`StoredSession.as_json`)."""
    return b'{"data": ' + session.as_json() + b"}"


def _json_response() -> web.Response:
    """An empty `application/json; charset=utf-8`, `no-store` response (`_json_body` fills it)."""
    return web.Response(headers=_JSON_NO_STORE)


def _json_body(response: web.Response, body: dict[str, Any]) -> web.Response:
    """`response` with `body` as its JSON text (the same bytes `json_response` writes)."""
    response.body = json.dumps(body).encode("utf-8")
    return response


async def get_session_data(request: web.Request) -> web.Response:
    """`{"data": {...}}`; `{}` without a session. A read slides the TTL, never creates.

    `?slide=0`: a status read for frontends that poll. Nothing slides; the answer adds the
    whole seconds left before the session expires idle (`idle_expires_in`) and before its
    absolute deadline (`absolute_expires_in`), both `null` without a session
    (`absolute_expires_in` also when `SESSION_ABSOLUTE_SECONDS` is 0, off). One round trip.
    """
    # No query string (the usual read): nothing to parse.
    slide = request.query.get("slide", "1") if request.rel_url.raw_query_string else "1"
    if slide not in ("0", "1"):
        raise ApiError(400, "invalid_parameter", "slide must be 0 or 1.")
    if slide == "1":
        session = await get_session(request)
        response = _json_response()
        response.body = _data_body(session)
        return response
    status = await storage_of(request).peek_session(request)
    request[SESSION_KEY] = status.session  # unchanged: nothing is saved
    return web.json_response(
        {
            "data": dict(status.session),
            "idle_expires_in": status.idle_expires_in,
            "absolute_expires_in": status.absolute_expires_in,
        },
        headers=NO_STORE,
    )


async def patch_session_data(request: web.Request) -> web.Response:
    """Merge a JSON object into `data`, the session's mapping (`null` removes a key); creates
    the session if needed.

    Concurrent PATCHes of one session (even on different replicas) never lose each other's
    keys: the merge is re-applied to the fresh value when another write got in first.
    """
    patch = await _json_object(request)

    def merge(session: StoredSession) -> None:
        # Only keys whose value differs are written: an unchanged session is not saved.
        for key, value in patch.items():
            if value is None:
                if key in session:
                    del session[key]
            elif key not in session or session[key] != value:
                session[key] = value

    response = _json_response()
    session = await update_session(request, response, merge)
    return _json_body(response, {"data": dict(session)})


async def rotate_session_id(request: web.Request) -> web.Response:
    """`POST .../session/rotate`: a new session id for the same data (call it after a
    privilege change such as a login); the old id is dead before this answers.

    `{"data": {...}, "rotated": true}`, the new cookie set; without a session nothing is
    created and `rotated` is false.
    """
    response = _json_response()
    session = await rotate_session(request, response)
    rotated = session.stored and session.identity is not None
    return _json_body(response, {"data": dict(session), "rotated": rotated})


async def delete_session(request: web.Request) -> web.Response:
    """Logout: delete the stored session and expire the cookie. 204 even without a session;
    409 `session_rotated` (cookie untouched, nothing deleted) when the id was rotated away.

    Only the id matters here, so nothing is read first: one store call that deletes unless a
    rotation tombstone is there (`SessionStorage._end`).
    """
    session = storage_of(request).unread_session(request)
    request[SESSION_KEY] = session
    response = web.Response(status=204, headers=NO_STORE)
    session.invalidate()
    await commit_session(request, response)
    return response


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object. 413 over the cap, 400 `invalid_json`, 408 `body_timeout`
    when the whole body has not arrived within `BODY_TIMEOUT_SECONDS` (nothing changed)."""
    settings = request.app[SETTINGS_KEY]
    cap = settings.session_max_bytes * 2
    if request.content.is_eof():
        # The whole body is buffered already (the usual small PATCH): reading cannot wait.
        raw = await _read_body(request, cap)
    else:
        try:
            async with asyncio.timeout(settings.body_timeout_seconds):
                raw = await _read_body(request, cap)
        except TimeoutError as err:
            # A stalled body must not hold the handler (and a shutdown) forever; the unread
            # rest makes the connection unusable, so aiohttp closes it after this answer.
            raise BodyTimeout() from err
    try:
        value = _JSON_DECODER.decode(bytes(raw).decode("utf-8"))
        # Each level of nesting takes a `{` or `[`: fewer of them than the limit (strings
        # included) cannot nest too deep, so the walk is skipped.
        if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and _depth_exceeds(
            value, MAX_JSON_DEPTH
        ):
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        # A lone surrogate (`"\ud800"`) parses but has no UTF-8 form: it could be neither
        # stored nor echoed. Refuse it here, not as a 500 when the session is encoded. The body
        # was valid UTF-8, so only a `\u` escape can make one.
        if b"\\u" in raw:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, ValueError, RecursionError) as err:
        raise ApiError(400, "invalid_json", "The body must be a JSON object.") from err
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_json", "The body must be a JSON object.")
    return value


async def _read_body(request: web.Request, cap: int) -> bytes | bytearray:
    # A PATCH can never yield a session over SESSION_MAX_BYTES, so reading more than twice
    # that (JSON escaping slack) is pointless: refuse early, nothing changed.
    if request.content_length is not None and request.content_length > cap:
        raise BodyTooLarge()
    content = request.content
    raw: bytes | bytearray
    if content.is_eof():
        # All of it is buffered already: take it without a read per piece.
        raw = content.read_nowait(cap + 1)
    else:
        # `read(n)` returns whatever has arrived (up to n), not the whole body: a chunked or
        # slow body comes in pieces, so read until the end or just past the cap.
        raw = bytearray()
        while len(raw) <= cap:
            piece = await content.read(cap + 1 - len(raw))
            if not piece:
                break
            raw += piece
    if len(raw) > cap:
        raise BodyTooLarge()
    return raw


# Deeper JSON is refused (400): no real session value needs it, and encoding very deep values
# later would hit the interpreter's recursion limit (a 500) instead.
MAX_JSON_DEPTH = 64


def _reject_constant(name: str) -> Any:
    """`NaN`, `Infinity`, `-Infinity`: Python's json accepts them, JSON (and the browser's
    `JSON.parse`) does not."""
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """A JSON number with a fraction or exponent, refused when it overflows a float
    (`1e400` would be stored as `Infinity` and answered as text that is not JSON)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


# `json.loads(text, parse_constant=...)` builds a decoder per call; one is enough.
_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _depth_exceeds(value: Any, limit: int) -> bool:
    """True when containers in `value` nest more than `limit` levels (iterative: no
    recursion limit of its own)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


async def method_not_allowed(request: web.Request) -> web.Response:
    raise web.HTTPMethodNotAllowed(request.method, ["GET", "PATCH", "DELETE"])
