"""The aiohttp-session storage: cookie, session id, key format, stored value, lifetimes.

- Redis key: `{prefix}{applicationId}:{sessionId}`; one string value per session.
- Session id: `secrets.token_urlsafe(32)` (256 bits, 43 URL-safe characters), validated against
  `SESSION_ID_RE` before any store call; a malformed, oversized or unknown id is "no session".
- Stored value: see `app.sessions.codec` (JSON `{"v":1,"r":<revision>,"data":{...},"gw":{...}}`,
  or its encrypted form). `data` is what the browser may read and write; `gw` holds the
  gateway's own fields (conversation id, `created_at`). A value that is corrupt, of an unknown
  version, or bound to another session counts as no session and is deleted. One this gateway
  cannot decrypt (a key only other replicas have, a retired key, tampered) counts as no session
  and is left in place for the replicas that can; a plaintext value while encryption is on is
  read and re-encrypted at once (see `app.sessions.codec`).
- Idle lifetime (`SESSION_TTL_SECONDS`): loading is one `get_and_touch` (GETEX ... EX), so
  every request that uses the session slides it; each save sets it again. Nothing is written
  when nothing changed.
- Absolute lifetime (`SESSION_ABSOLUTE_SECONDS`, off by default: 0) counts from
  `gw.created_at`: past it the value is deleted on load and the session is gone, however active.
  Every TTL the gateway sets is `min(idle TTL, time left before the absolute deadline)`; a
  read's GETEX slides to the idle TTL, so in the last idle-TTL's worth of a session's life a
  read adds one `EXPIRE` pulling the key's TTL back to the deadline (earlier, the read stays
  one command).
- Updates are compare-and-set on the revision loaded with the session (`SessionConflict` when
  another request wrote first; the caller re-reads and re-applies, see
  `app.sessions.middleware.update_session`); a session deleted meanwhile is never resurrected.
- Rotation (`rotate`): the data moves to a fresh id (`SET NX`), then the old key is replaced
  by a rotation tombstone (`SET XX GET EX`; a write that landed meanwhile is copied over); the
  old id is dead before the response goes out, and requests carrying it get 409
  `session_rotated` while the tombstone lives. Single-key operations, so it works on Redis
  Cluster. `created_at` is kept: rotating never extends the absolute lifetime.
- Cookie: one per application, `Path=/apps/{applicationId}`, HttpOnly, SameSite per setting,
  Secure per setting (`auto`: when the browser used HTTPS), no Domain, no Max-Age. Read with
  `app.sessions.cookies.choose_session_id`: two distinct ids under our name (a planted cookie)
  count as no session.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from aiohttp_session import AbstractStorage, Session

from app.config import Settings
from app.forwarding import client_scheme
from app.sessions.backend import SessionBackend, StoreUnavailable, revision_of
from app.sessions.codec import (
    CREATED_AT,
    DATA,
    FORMAT_VERSION,
    GATEWAY,
    Decoded,
    SessionCodec,
    SessionTooLarge,
    tombstone,
)
from app.sessions.cookies import (
    SESSION_ID_RE,
    Ambiguous,
    choose_session_id,
    named_session_ids,
)

log = logging.getLogger(__name__)

_SESSION_ID_AT = re.compile(r"[A-Za-z0-9_-]{43}")  # SESSION_ID_RE without anchors (for `pos`)
# Set on a request once its ambiguous session cookies were logged (once per request).
_AMBIGUITY_LOGGED = web.RequestKey("session_cookie_ambiguity_logged", bool)

APP_ID_KEY = web.RequestKey("application_id", str)
# Stored values the codec keeps decoded (`SessionCodec.decode`): about 2,000 sessions of 250
# bytes, a few MB of memory at most; values over 1/64 of it are never kept.
DECODE_CACHE_BYTES = 512 * 1024

__all__ = [
    "APP_ID_KEY",
    "DATA",
    "FORMAT_VERSION",
    "GATEWAY",
    "SESSION_ID_RE",
    "GatewaySession",
    "GatewayStorage",
    "SessionConflict",
    "SessionEnded",
    "SessionRotated",
    "SessionTooLarge",
    "new_session_id",
    "session_key",
]


class SessionEnded(Exception):
    """The session was deleted (logout elsewhere) while this request held it; not resurrected."""


class SessionConflict(Exception):
    """Another request changed the session since it was loaded; nothing was written."""


class SessionRotated(SessionConflict):
    """The request's session id was rotated away (a rotation tombstone is at its key): nothing
    was read or written; answered 409 `session_rotated` without touching the cookie, so the
    browser keeps (and retries with) the new one. A `SessionConflict`, so that every place that
    answers a lost race answers this too."""


class GatewaySession(Session):
    """An aiohttp-session `Session` plus the stored revision it was loaded at, and the decoded
    value it was loaded from (shared with other requests reading the same value: read only)."""

    revision: str = "0"
    decoded: Decoded | None = None


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def session_key(prefix: str, app_id: str, session_id: str) -> str:
    """The store key: `{prefix}{applicationId}:{sessionId}`."""
    return f"{prefix}{app_id}:{session_id}"


# `Decoded.problem` of a readable value past its absolute deadline (`_decode`).
_PAST_DEADLINE = "past the absolute lifetime"


def _empty() -> GatewaySession:
    return GatewaySession(None, data=None, new=True, max_age=None)


def _loaded(session_id: str, decoded: Decoded, revision: str) -> GatewaySession:
    """A session on `decoded`'s mapping, which it does not change: `data` and `gw` are copied
    (the codec may hand the same `Decoded` to other requests); values inside them are replaced,
    never changed in place, by every writer (`patch_session_data`, `ensure_conversation`)."""
    mapping = decoded.mapping
    assert mapping is not None
    gateway = mapping[GATEWAY]
    session = GatewaySession(
        session_id,
        data={
            "created": int(gateway[CREATED_AT]),
            "session": {DATA: dict(mapping[DATA]), GATEWAY: dict(gateway)},
        },
        new=False,
        max_age=None,
    )
    session.revision = revision
    session.decoded = decoded
    return session


@dataclass(frozen=True, slots=True)
class SessionStatus:
    """A session read without sliding, with its remaining lifetimes in whole seconds
    (`None` without a session)."""

    session: GatewaySession
    idle_expires_in: int | None
    absolute_expires_in: int | None


class GatewayStorage(AbstractStorage):
    """aiohttp-session storage keyed per application, over any `SessionBackend`."""

    def __init__(
        self,
        backend: SessionBackend,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            cookie_name=settings.cookie_name,
            max_age=None,
            httponly=True,
            samesite=settings.cookie_samesite,
        )
        self.backend = backend
        self.settings = settings
        # aiohttp reads ASCII cookie names only (a non-ASCII one never matches).
        self._cookie_prefix = f"{settings.cookie_name}=" if settings.cookie_name.isascii() else ""
        self.codec = SessionCodec(
            settings.session_encryption_keys,
            max_bytes=settings.session_max_bytes,
            refresh_after=settings.session_ttl_seconds,
            clock=lambda: self.clock(),
            cache_bytes=DECODE_CACHE_BYTES,
        )
        self._encrypted = self.codec.encrypted
        # Wall clock (created_at is a Unix time shared by every replica); tests may move it.
        self.clock = clock

    # -- identity ---------------------------------------------------------------------------

    def load_cookie(self, request: web.Request) -> str | None:
        """The session id the request's cookies name, or None: absent, malformed, or
        ambiguous (two distinct ids under our name: a planted cookie, see
        `app.sessions.cookies`; logged once per request, without the values)."""
        headers = request.headers.getall(hdrs.COOKIE, None)
        if not headers:
            return None
        if len(headers) == 1:
            header = headers[0]
            prefix = self._cookie_prefix
            if (
                prefix
                and header.startswith(prefix)
                and _SESSION_ID_AT.fullmatch(header, len(prefix))
            ):
                return header[len(prefix) :]  # the browser's usual header: just our cookie
        choice = choose_session_id(headers, self.cookie_name)
        if isinstance(choice, Ambiguous):
            if not request.get(_AMBIGUITY_LOGGED):
                request[_AMBIGUITY_LOGGED] = True
                log.warning(
                    "the Cookie header names several distinct %s session ids (a cookie planted "
                    "by a sibling site or by script?): treated as no session (application %s)",
                    self.cookie_name,
                    request.get(APP_ID_KEY),
                )
            return None
        return choice

    def key_for(self, request: web.Request, session_id: str) -> str:
        return session_key(self.settings.redis_prefix, request[APP_ID_KEY], session_id)

    @staticmethod
    def binding(request: web.Request, session_id: str) -> str:
        """What an encrypted value is bound to: its application and session id."""
        return f"{request[APP_ID_KEY]}:{session_id}"

    # -- lifetimes --------------------------------------------------------------------------

    def absolute_left(self, created_at: int) -> float:
        """Seconds until the absolute deadline of a session created at `created_at`;
        `math.inf` when the absolute lifetime is off (`SESSION_ABSOLUTE_SECONDS=0`)."""
        if self.settings.session_absolute_seconds <= 0:
            return math.inf
        return created_at + self.settings.session_absolute_seconds - self.clock()

    def ttl_for(self, created_at: int) -> int:
        """The TTL to store with: the idle TTL, cut to the absolute deadline (0: past it)."""
        left = self.absolute_left(created_at)
        if left <= 0:
            return 0
        if left >= self.settings.session_ttl_seconds:
            return self.settings.session_ttl_seconds
        return math.ceil(left)

    # -- load -------------------------------------------------------------------------------

    def _decode(self, request: web.Request, session_id: str, raw: bytes) -> Decoded:
        """`raw` decoded; its mapping is None when it cannot be used (see `_drop`). No I/O:
        a readable value costs no coroutine."""
        # The binding matters only to encrypted values (plaintext ones never check it).
        binding = self.binding(request, session_id) if self._encrypted else ""
        decoded = self.codec.decode(raw, binding)
        mapping = decoded.mapping
        if mapping is not None and self.absolute_left(mapping[GATEWAY][CREATED_AT]) <= 0:
            return Decoded(None, _PAST_DEADLINE)
        return decoded

    async def _drop(self, request: web.Request, key: str, refused: Decoded) -> None:
        """After `_decode` refused a value: remove it, unless another replica may be able to
        read it (`keep`)."""
        if refused.keep:
            log.info(
                "session value not readable here: %s (application %s)",
                refused.problem,
                request[APP_ID_KEY],
            )
            return
        if refused.problem is _PAST_DEADLINE:
            log.info("session reached its absolute lifetime (application %s)", request[APP_ID_KEY])
        else:
            log.warning(
                "session value removed: %s (application %s)", refused.problem, request[APP_ID_KEY]
            )
        await self.backend.delete(key)

    async def _reencrypt(
        self,
        request: web.Request,
        session_id: str,
        key: str,
        mapping: dict[str, Any],
        revision: str,
        ttl: int,
    ) -> str:
        """Best effort: store a stale value encrypted under the first key (compare-and-set, so
        a write that got in first wins). The revision the session now has."""
        new_revision = int(revision) + 1
        try:
            encoded = self.codec.encode(mapping, new_revision, self.binding(request, session_id))
            result = await self.backend.compare_and_set(key, revision, encoded, ttl)
        except (SessionTooLarge, StoreUnavailable) as err:
            # The next write encrypts it (or answers the error itself).
            log.info("stale session value not re-encrypted now: %s", err)
            return revision
        return str(new_revision) if result == "ok" else revision

    async def load_session(self, request: web.Request) -> Session:
        """Load and slide; a read never creates anything. Raises `StoreUnavailable`."""
        session_id = self.load_cookie(request)
        if session_id is None:
            return _empty()
        key = self.key_for(request, session_id)
        idle = self.settings.session_ttl_seconds
        raw = await self.backend.get_and_touch(key, idle)
        if raw is None:
            return _empty()
        decoded = self._decode(request, session_id, raw)
        mapping = decoded.mapping
        if mapping is None:
            if decoded.rotated:
                # GETEX just slid the tombstone to the idle TTL: pull it back to its own.
                await self.backend.expire(key, self.settings.session_rotation_tombstone_seconds)
                raise SessionRotated("the session id was rotated; the new cookie is current")
            await self._drop(request, key, decoded)
            return _empty()
        revision = revision_of(raw)
        ttl = self.ttl_for(mapping[GATEWAY][CREATED_AT])
        if decoded.stale:
            # Plaintext while encryption is on, or under an older key for a while: encrypt it
            # under the first key now (sets the TTL too).
            revision = await self._reencrypt(
                request, session_id, key, mapping, revision, max(ttl, 1)
            )
        elif ttl < idle:
            # GETEX just slid the key to the idle TTL, past the absolute deadline.
            await self.backend.expire(key, max(ttl, 1))
        return _loaded(session_id, decoded, revision)

    async def peek_session(self, request: web.Request) -> SessionStatus:
        """The session without sliding it, with its remaining idle and absolute lifetimes.

        One round trip (`peek`); a value past its absolute deadline is deleted (a second one).
        """
        session_id = self.load_cookie(request)
        if session_id is None:
            return SessionStatus(_empty(), None, None)
        key = self.key_for(request, session_id)
        found = await self.backend.peek(key)
        if found is None:
            return SessionStatus(_empty(), None, None)
        raw, ttl_left = found
        decoded = self._decode(request, session_id, raw)
        mapping = decoded.mapping
        if mapping is None:
            if decoded.rotated:
                raise SessionRotated("the session id was rotated; the new cookie is current")
            await self._drop(request, key, decoded)
            return SessionStatus(_empty(), None, None)
        absolute = self.absolute_left(mapping[GATEWAY][CREATED_AT])
        idle = absolute if ttl_left is None else min(ttl_left, absolute)
        return SessionStatus(
            _loaded(session_id, decoded, revision_of(raw)),
            None if math.isinf(idle) else max(int(idle), 0),
            None if math.isinf(absolute) else max(int(absolute), 0),
        )

    def session_for_logout(self, request: web.Request) -> Session:
        """A handle on the cookie's session without reading it (logout needs only the id)."""
        session_id = self.load_cookie(request)
        if session_id is None:
            return _empty()
        return GatewaySession(session_id, data={"session": {}}, new=False, max_age=None)

    # -- save -------------------------------------------------------------------------------

    def _prepare(self, session: Session) -> int:
        """Fill in the envelope fields of a session about to be written; its `created_at`."""
        gateway = session.get(GATEWAY)
        if not isinstance(gateway, dict):
            gateway = {}
            session[GATEWAY] = gateway
        created = gateway.get(CREATED_AT)
        if not isinstance(created, int) or isinstance(created, bool):
            created = int(self.clock())
            gateway[CREATED_AT] = created
        session.setdefault(DATA, {})
        return created

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        """Write a changed session; delete an invalidated one. Raises `SessionTooLarge`,
        `SessionConflict` (changed meanwhile: nothing written), `SessionEnded` (deleted
        meanwhile, or past its absolute deadline: not resurrected) or `StoreUnavailable`."""
        if session.empty:
            if session.identity is not None:
                await self.backend.delete(self.key_for(request, session.identity))
            elif request.get(_AMBIGUITY_LOGGED):
                # Logout with several ids under our name (a planted cookie next to ours): which
                # one is the user's is unknown, so every one named ends (the user's among them;
                # a planted one is the planter's own). Otherwise the user's would outlive it.
                names = named_session_ids(request.headers.getall(hdrs.COOKIE), self.cookie_name)
                for session_id in sorted(names):
                    await self.backend.delete(self.key_for(request, session_id))
            self.expire_cookie(request, response)
            return
        created = self._prepare(session)
        ttl = self.ttl_for(created)
        if session.identity is not None and not session.new:
            key = self.key_for(request, session.identity)
            if ttl <= 0:
                await self.backend.delete(key)
                raise SessionEnded("the session reached its absolute lifetime")
            expected = session.revision if isinstance(session, GatewaySession) else "0"
            revision = int(expected) + 1
            # Remembered: the next read of this session (a GET after the PATCH) needs no decode.
            encoded = self.codec.encode(
                dict(session), revision, self.binding(request, session.identity), remember=True
            )
            result = await self.backend.compare_and_set(key, expected, encoded, ttl)
            if result == "missing":
                raise SessionEnded("the session was deleted while this request was running")
            if result == "conflict":
                raise SessionConflict("the session changed while this request was running")
            if isinstance(session, GatewaySession):
                session.revision = str(revision)
            return
        if ttl <= 0:  # a brand-new session cannot be past its deadline unless the clock jumped
            raise SessionEnded("the session reached its absolute lifetime")
        await self._create(request, response, session, ttl, revision=1)

    async def _create(
        self,
        request: web.Request,
        response: web.StreamResponse,
        session: Session,
        ttl: int,
        *,
        revision: int,
    ) -> None:
        """Store `session` under a fresh id and set the cookie (SET NX: never overwrites).

        A new session may carry an id chosen in advance by the gateway (`reserve_id`); it is
        tried first."""
        mapping = dict(session)
        reserved = session.identity if session.new else None
        for attempt in range(3):
            if attempt == 0 and isinstance(reserved, str):
                session_id = reserved
            else:
                session_id = new_session_id()
            encoded = self.codec.encode(mapping, revision, self.binding(request, session_id))
            if await self.backend.create(self.key_for(request, session_id), encoded, ttl):
                session._identity = session_id
                session._new = False
                if isinstance(session, GatewaySession):
                    session.revision = str(revision)
                self.set_cookie(request, response, session_id)
                return
        raise RuntimeError("could not allocate a unique session id")  # 2**-256 odds

    @staticmethod
    def reserve_id(session: Session) -> str | None:
        """The id a new session will be stored under (minted now, by the gateway), so that
        something keyed by it (a rate-limit bucket) can be used before it is created; the id
        of a stored session; None for a session already cleared."""
        if session.new and session.identity is None:
            session.set_new_identity(new_session_id())
        identity = session.identity
        return identity if isinstance(identity, str) else None

    async def rotate(
        self, request: web.Request, response: web.StreamResponse, session: GatewaySession
    ) -> bool:
        """Move a stored `session` to a fresh id and kill the old one (always True when it
        returns: the new cookie is set on `response`).

        1. The session is stored under a fresh id (`SET NX`).
        2. The old key is replaced, blindly and atomically, by a rotation tombstone
           (`replace`: `SET XX GET`, TTL `SESSION_ROTATION_TOMBSTONE_SECONDS`), which returns
           the last value any write left there. From then on the old id reads and writes
           nothing: a request carrying it gets 409 `session_rotated` (`SessionRotated`, cookie
           untouched) while the tombstone lives, and a write that loaded the session before
           loses its compare-and-set against it.
        3. If a write landed between the load and step 2, its value is copied to the new key
           (which no one else knows yet), so no acknowledged write is lost.

        Raises `SessionEnded` (the old session was gone, or past its absolute deadline),
        `SessionRotated` (another request rotated it first; this request's copy is removed),
        `StoreUnavailable` (before step 2: the old id stays valid and the copy is removed; a
        lost reply of step 2 itself is recognised on retry by the tombstone's nonce).
        Single-key operations only: works on Redis Cluster.
        """
        old_id = session.identity
        assert isinstance(old_id, str) and not session.new
        old_key = self.key_for(request, old_id)
        ttl = self.ttl_for(self._prepare(session))
        if ttl <= 0:
            await self.backend.delete(old_key)
            raise SessionEnded("the session reached its absolute lifetime")
        expected = session.revision
        new_revision = int(expected) + 1
        cookie_before = response.cookies.get(self.cookie_name)
        cookie_before = cookie_before.copy() if cookie_before is not None else None

        def restore_cookie() -> None:
            if cookie_before is None:
                response.cookies.pop(self.cookie_name, None)
            else:
                response.cookies[self.cookie_name] = cookie_before

        moved = _empty()
        moved.update(dict(session))
        await self._create(request, response, moved, ttl, revision=new_revision)
        new_id = moved.identity
        assert isinstance(new_id, str)
        new_key = self.key_for(request, new_id)
        marker = tombstone(new_session_id())
        try:
            last = await self.backend.replace(
                old_key, marker, self.settings.session_rotation_tombstone_seconds
            )
        except BaseException:
            await self._discard(new_key)
            restore_cookie()
            raise
        if last is None or (last != marker and revision_of(last) != expected):
            latest = None if last is None or last == marker else self._decode(request, old_id, last)
            if latest is None or latest.mapping is None:
                await self._discard(new_key)
                restore_cookie()
                if latest is not None and latest.rotated:
                    raise SessionRotated("the session was rotated by another request meanwhile")
                raise SessionEnded("the session was deleted while it was being rotated")
            # A write landed after this request loaded the session: carry it over (the new
            # key is known only to this request, so this compare-and-set cannot lose).
            session[DATA] = dict(latest.mapping[DATA])  # copies: `latest` may be cached
            session[GATEWAY] = dict(latest.mapping[GATEWAY])
            session.decoded = latest
            encoded = self.codec.encode(
                dict(session), new_revision + 1, self.binding(request, new_id)
            )
            result = await self.backend.compare_and_set(new_key, str(new_revision), encoded, ttl)
            if result != "ok":  # expired within the request: as if deleted meanwhile
                restore_cookie()
                raise SessionEnded("the rotated session vanished while it was being written")
            new_revision += 1
        session._identity = new_id
        session.revision = str(new_revision)
        session._changed = False
        return True

    async def _discard(self, key: str) -> None:
        """Best effort: remove a key this request created but must not keep."""
        try:
            await self.backend.delete(key)
        except Exception:  # its TTL removes it anyway
            log.warning("could not remove an abandoned rotated session key", exc_info=True)

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
