"""The aiohttp-session storage: cookie, session id, key format, stored value, TTL policy.

- Redis key: `{prefix}{applicationId}:{sessionId}`; one string value per session.
- Session id: `secrets.token_urlsafe(32)` (256 bits, 43 URL-safe characters), validated against
  `SESSION_ID_RE` before any store call; a malformed, oversized or unknown id is "no session".
- Stored value: JSON `{"v": 1, "data": {...}, "gw": {...}}`. `data` is what the browser may read
  and write; `gw` holds the gateway's own fields (conversation id, timestamps). A value that is
  not valid UTF-8 JSON of that shape, or has an unknown version, counts as no session and is
  deleted.
- TTL: loading is one `get_and_touch` (GETEX ... EX), so every request that uses the session
  slides its idle lifetime; each save sets it again. Nothing is written when nothing changed.
- Cookie: one per application, `Path=/apps/{applicationId}`, HttpOnly, SameSite per setting,
  Secure per setting (`auto`: when the browser used HTTPS), no Domain, no Max-Age.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from typing import Any

from aiohttp import web
from aiohttp_session import AbstractStorage, Session

from app.config import Settings
from app.forwarding import client_scheme
from app.sessions.backend import SessionBackend

log = logging.getLogger(__name__)

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
FORMAT_VERSION = 1
DATA = "data"
GATEWAY = "gw"

APP_ID_KEY = web.RequestKey("application_id", str)


class SessionTooLarge(Exception):
    """The serialized session would exceed `SESSION_MAX_BYTES`; nothing was written."""


class SessionEnded(Exception):
    """The session was deleted (logout elsewhere) while this request held it; not resurrected."""


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def session_key(prefix: str, app_id: str, session_id: str) -> str:
    """The store key: `{prefix}{applicationId}:{sessionId}`."""
    return f"{prefix}{app_id}:{session_id}"


def encode_value(mapping: dict[str, Any]) -> bytes:
    value = {"v": FORMAT_VERSION, DATA: mapping.get(DATA, {}), GATEWAY: mapping.get(GATEWAY, {})}
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_value(raw: bytes) -> dict[str, Any] | None:
    """The session mapping, or None when the stored value is corrupt or of an unknown version."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or value.get("v") != FORMAT_VERSION:
        return None
    data, gateway = value.get(DATA), value.get(GATEWAY)
    if not isinstance(data, dict) or not isinstance(gateway, dict):
        return None
    return {DATA: data, GATEWAY: gateway}


class GatewayStorage(AbstractStorage):
    """aiohttp-session storage keyed per application, over any `SessionBackend`."""

    def __init__(self, backend: SessionBackend, settings: Settings) -> None:
        super().__init__(
            cookie_name=settings.cookie_name,
            max_age=None,
            httponly=True,
            samesite=settings.cookie_samesite,
        )
        self.backend = backend
        self.settings = settings

    # -- identity ---------------------------------------------------------------------------

    def load_cookie(self, request: web.Request) -> str | None:
        """The session id from the cookie, or None when absent or malformed."""
        value = request.cookies.get(self.cookie_name)
        if value is None or not SESSION_ID_RE.fullmatch(value):
            return None
        return value

    def key_for(self, request: web.Request, session_id: str) -> str:
        return session_key(self.settings.redis_prefix, request[APP_ID_KEY], session_id)

    # -- load -------------------------------------------------------------------------------

    async def load_session(self, request: web.Request) -> Session:
        """Load and slide; a read never creates anything. Raises `StoreUnavailable`."""
        session_id = self.load_cookie(request)
        if session_id is None:
            return Session(None, data=None, new=True, max_age=None)
        key = self.key_for(request, session_id)
        raw = await self.backend.get_and_touch(key, self.settings.session_ttl_seconds)
        if raw is None:
            return Session(None, data=None, new=True, max_age=None)
        mapping = decode_value(raw)
        if mapping is None:
            log.warning("corrupt session value removed (application %s)", request[APP_ID_KEY])
            await self.backend.delete(key)
            return Session(None, data=None, new=True, max_age=None)
        created = mapping[GATEWAY].get("created_at")
        return Session(
            session_id,
            data={"created": int(created) if isinstance(created, int) else 0, "session": mapping},
            new=False,
            max_age=None,
        )

    def session_for_logout(self, request: web.Request) -> Session:
        """A handle on the cookie's session without reading it (logout needs only the id)."""
        session_id = self.load_cookie(request)
        if session_id is None:
            return Session(None, data=None, new=True, max_age=None)
        return Session(session_id, data={"session": {}}, new=False, max_age=None)

    # -- save -------------------------------------------------------------------------------

    def encode(self, session: Session) -> bytes:
        """The stored bytes for `session`; raises `SessionTooLarge` over the limit."""
        encoded = encode_value(dict(session))
        if len(encoded) > self.settings.session_max_bytes:
            raise SessionTooLarge(
                f"session is {len(encoded)} bytes; the limit is {self.settings.session_max_bytes}"
            )
        return encoded

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        """Write a changed session; delete an invalidated one. Raises `SessionTooLarge`,
        `SessionEnded` (deleted meanwhile: not resurrected) or `StoreUnavailable`."""
        ttl = self.settings.session_ttl_seconds
        if session.empty:
            if session.identity is not None:
                await self.backend.delete(self.key_for(request, session.identity))
            self.expire_cookie(request, response)
            return
        if GATEWAY not in session:
            session[GATEWAY] = {}
        session[GATEWAY].setdefault("created_at", int(time.time()))
        session.setdefault(DATA, {})
        encoded = self.encode(session)
        if session.identity is not None and not session.new:
            if not await self.backend.update(self.key_for(request, session.identity), encoded, ttl):
                raise SessionEnded("the session was deleted while this request was running")
            return
        for _ in range(3):
            session_id = new_session_id()
            if await self.backend.create(self.key_for(request, session_id), encoded, ttl):
                session._identity = session_id
                session._new = False
                self.set_cookie(request, response, session_id)
                return
        raise RuntimeError("could not allocate a unique session id")  # 2**-256 odds

    # -- cookie -----------------------------------------------------------------------------

    def cookie_path(self, request: web.Request) -> str:
        return f"/apps/{request[APP_ID_KEY]}"

    def cookie_secure(self, request: web.Request) -> bool:
        mode = self.settings.cookie_secure
        if mode == "auto":
            return client_scheme(request, self.settings.trusted_proxies) == "https"
        return mode == "true"

    def set_cookie(self, request: web.Request, response: web.StreamResponse, value: str) -> None:
        response.set_cookie(
            self.cookie_name,
            value,
            path=self.cookie_path(request),
            httponly=True,
            secure=self.cookie_secure(request),
            samesite=self.settings.cookie_samesite,
        )

    def expire_cookie(self, request: web.Request, response: web.StreamResponse) -> None:
        response.del_cookie(
            self.cookie_name,
            path=self.cookie_path(request),
            secure=self.cookie_secure(request),
            httponly=True,
            samesite=self.settings.cookie_samesite,
        )
