"""`SessionStorage`: a public aiohttp-session storage over Redis or memory, usable on its own.

    from aiohttp_session import setup, get_session
    from app.sessions.storage import SessionStorage

    setup(app, SessionStorage("redis://localhost:6379/0", max_age=3600))

The store is a `redis.asyncio` client, a Redis URL (`app.sessions.redis_url.parse_redis_url`:
single server, TLS, Sentinel, Cluster), or a `SessionBackend` (`MemoryBackend()` for one
process, `RedisBackend(client)`). docs/sessions.md documents every option, the plain-app
example, and where this storage deliberately differs from aiohttp-session's own storages.

- Redis key: `{key_prefix}{namespace}:{sessionId}`, one string value per session; the
  namespace is a fixed name or a function of the request (the gateway: the application id).
- Session id: `secrets.token_urlsafe(32)` (256 bits, 43 URL-safe characters), minted by the
  storage (never by the client) and validated against `SESSION_ID_RE` before any store call; a
  malformed, oversized or unknown id is "no session".
- Sessions are `StoredSession`s (aiohttp-session's `Session`): every top-level key a handler
  sets is stored and comes back as the session's own mapping. Beside it the store keeps, out
  of a handler's reach, the revision, `created_at` (first stored), a per-session `max_age`,
  and metadata fields (`StoredSession.meta`; the gateway's conversation id). Stored value:
  see `app.sessions.codec` (the values of earlier releases load, and they read ours). A value that
  is corrupt, of an unknown version, or bound to another session counts as no session and is
  deleted. One this storage cannot decrypt (a key only other replicas have, a retired key,
  tampered) counts as no session and is left in place for the replicas that can; a plaintext
  value while encryption is on is read and re-encrypted at once.
- Idle lifetime: the store TTL is the session's `max_age` (aiohttp-session's: also the
  cookie's Max-Age) or else `idle_ttl`. Loading is one `GETEX ... EX` (`get_and_touch`), so
  every request that uses the session slides it; each save sets it again. Nothing is written
  when nothing changed. With a `max_age`, the session also ends `max_age` seconds after its
  last change (`Session.created`), as the cookie does (aiohttp-session's rule); a
  per-session `max_age` different from the storage's costs one `EXPIRE` per read.
- Absolute lifetime (`absolute_lifetime`, off by default) counts from `created_at`: past it
  the value is deleted on load and the session is gone, however active. Every TTL set is
  `min(TTL, time left before the absolute deadline)`; a read's GETEX slides to the TTL, so in
  the last TTL's worth of a session's life a read adds one `EXPIRE` pulling the key's TTL
  back to the deadline (earlier, the read stays one command).
- Saves are compare-and-set on the revision loaded with the session: `SessionConflict` (409)
  when another request wrote first, `SessionEnded` (409, cookie expired) when the session was
  deleted meanwhile (never resurrected) or reached its absolute lifetime. Both are
  `web.HTTPConflict`s with a JSON body, so aiohttp-session's own `session_middleware` answers
  them as they are, never as a 500; the gateway re-reads and re-applies instead
  (`app.sessions.middleware.update_session`).
- Invalidation: a session with an empty mapping and no metadata is no session: saving it
  deletes the key and expires the cookie.
- Rotation (`rotate`): the data moves to a fresh id (`SET NX`), then the old key is replaced
  by a rotation tombstone (`SET XX GET EX`; a write that landed meanwhile is copied over); the
  old id is dead before the response goes out, and requests carrying it get 409
  `session_rotated` (`SessionRotated`) while the tombstone lives (`rotation_tombstone_seconds`).
  Single-key operations, so it works on Redis Cluster. `created_at` is kept: rotating never
  extends the absolute lifetime.
- Cookie: `cookie_name`, path (default `/`; the gateway: `/apps/{applicationId}`), domain,
  Secure, HttpOnly, SameSite as configured; Max-Age and Expires only with a `max_age`. The
  cookie is set when a session is created or rotated, re-sent on every save (as
  aiohttp-session does; with `refresh_cookie=False` only when it has a `max_age`, to push its
  expiry: the gateway's choice), and expired when the session ends. Read with
  `app.sessions.cookies.choose_session_id`: two distinct ids under our name (a planted cookie)
  count as no session.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

import redis.asyncio as aioredis
from aiohttp import hdrs, web
from aiohttp_session import AbstractStorage, Session
from redis.asyncio.cluster import RedisCluster

from app.sessions.backend import SessionBackend, StoreUnavailable, revision_of
from app.sessions.codec import (
    NO_META,
    TOMBSTONE_REVISION,
    Decoded,
    SessionCodec,
    SessionTooLarge,
    copy_json,
    refused,
    tombstone,
)
from app.sessions.cookies import (
    SESSION_ID_RE,
    Ambiguous,
    choose_session_id,
    named_session_ids,
)
from app.sessions.memory import MemoryBackend
from app.sessions.options import (
    DEFAULT_IDLE_TTL,
    DEFAULT_KEY_PREFIX,
    DEFAULT_NAMESPACE,
    DEFAULT_ROTATION_TOMBSTONE_SECONDS,
    CookiePath,
    CookieSecure,
    Namespace,
    SessionOptions,
)
from app.sessions.redis import RedisBackend, RedisOptions, make_client

log = logging.getLogger(__name__)

_SESSION_ID_AT = re.compile(r"[A-Za-z0-9_-]{43}")  # SESSION_ID_RE without anchors (for `pos`)
# Set on a request once its ambiguous session cookies were logged (once per request).
_AMBIGUITY_LOGGED = web.RequestKey("session_cookie_ambiguity_logged", bool)
_NAMESPACE_RE = re.compile(r"^[^\s:]{1,128}$")

# Stored values the codec keeps decoded (`SessionCodec.decode`): about 2,000 sessions of 250
# bytes, a few MB of memory at most; values over 1/64 of it are never kept.
DECODE_CACHE_BYTES = 512 * 1024
# A rotation tombstone's revision (`tombstone`): a logout never deletes it (`_end`).
_TOMBSTONE = str(TOMBSTONE_REVISION)

Store = SessionBackend | aioredis.Redis | RedisCluster | str

__all__ = [
    "SESSION_ID_RE",
    "SessionConflict",
    "SessionEnded",
    "SessionOptions",
    "SessionRotated",
    "SessionStatus",
    "SessionStorage",
    "SessionTooLarge",
    "StoredSession",
    "new_session_id",
    "session_key",
]


def _error_body(code: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message}})


class SessionEnded(web.HTTPConflict):
    """409 `session_ended`: the session was deleted (logout elsewhere) or reached its
    absolute lifetime while this request held it; nothing was written, it is not resurrected.
    Raised by `save_session` with the cookie already expired on it."""

    code = "session_ended"

    def __init__(self, message: str = "The session ended (logged out) meanwhile.") -> None:
        super().__init__(
            text=_error_body(self.code, message),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )
        self.message = message


class SessionConflict(web.HTTPConflict):
    """409 `session_conflict` (with `Retry-After: 1`): another request changed the session
    since it was loaded; nothing was written. Load the session again and re-apply."""

    code = "session_conflict"

    def __init__(
        self, message: str = "The session kept changing under concurrent requests; retry."
    ) -> None:
        super().__init__(
            text=_error_body(self.code, message),
            content_type="application/json",
            headers={"Cache-Control": "no-store", "Retry-After": "1"},
        )
        self.message = message


class SessionRotated(SessionConflict):
    """409 `session_rotated`: the request's session id was rotated away (a rotation tombstone
    is at its key): nothing was read or written, and the cookie is left alone, so the browser
    keeps (and retries with) the new one. A `SessionConflict`, so that every place that
    answers a lost race answers this too."""

    code = "session_rotated"

    def __init__(
        self,
        message: str = (
            "The session id was rotated (e.g. at login) while this request used the old one; "
            "nothing was read or changed. Retry: the browser now holds the new cookie."
        ),
    ) -> None:
        web.HTTPConflict.__init__(
            self,
            text=_error_body(self.code, message),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )
        self.message = message


class StoredSession(Session):
    """aiohttp-session's `Session`, plus what the store keeps beside the mapping.

    The mapping is the session's content (`session["n"] = 1`), exactly as aiohttp-session
    documents. Beside it, out of the mapping's reach:
    - `meta`: metadata fields (JSON values) of the application, not of the user, e.g. the
      gateway's `conversation_id`; set with `set_meta` (which marks the session changed);
      `invalidate()` clears them too.
    - `revision`: the stored revision this session was loaded or saved at (None: not stored).
    - `created_at`: when the session was first stored (None: not yet).
    - `modified`: changed since it was loaded or last saved (`save_session` writes only then).
    """

    def __init__(
        self,
        identity: Any,
        *,
        data: Any,
        new: bool,
        max_age: int | None = None,
        revision: str | None = None,
        created_at: int | None = None,
        meta: Mapping[str, Any] = NO_META,
        source: Decoded | None = None,
    ) -> None:
        super().__init__(identity, data=data, new=new, max_age=max_age)
        self._revision = revision
        self._created_at = created_at
        self._meta = meta
        self._modified = False
        # The decoded value this session was loaded from (shared with other requests reading
        # the same value: read only), for `as_json`.
        self._source = source

    @property
    def revision(self) -> str | None:
        return self._revision

    @property
    def stored(self) -> bool:
        """True when the session is in the store: loaded from it, or saved by this request
        (a session created by this request keeps `new` True, as in aiohttp-session)."""
        return self._revision is not None

    @property
    def created_at(self) -> int | None:
        return self._created_at

    @property
    def meta(self) -> Mapping[str, Any]:
        """Metadata fields, read only (`set_meta` changes them): a loaded session's may be
        shared with other requests reading the same stored value."""
        return MappingProxyType(self._meta)

    @property
    def modified(self) -> bool:
        return self._modified

    def set_meta(self, name: str, value: Any) -> None:
        """Set a metadata field (a JSON value; None removes it) and mark the session changed.
        `created_at` and `max_age` are the storage's own names and are refused."""
        if name in ("created_at", "max_age"):
            raise ValueError(f"{name!r} is reserved by the storage")
        meta = dict(self._meta)  # copied: the loaded one may be shared
        if value is None:
            meta.pop(name, None)
        else:
            meta[name] = value
        self._meta = meta
        self.changed()

    def as_json(self) -> bytes:
        """The mapping as JSON (`json.dumps`' default separators), UTF-8. For a session
        unchanged since it was loaded, serialized once per stored value (shared by every
        request reading it), so an in-place change not followed by `changed()` is not seen."""
        source = self._source
        if source is None or self._modified:
            return json.dumps(dict(self)).encode("utf-8")
        body = source.json_body
        if body is None:
            body = source.json_body = json.dumps(dict(self)).encode("utf-8")
        return body

    # Every change goes through these four (MutableMapping's pop/update/clear included).
    def changed(self) -> None:
        super().changed()
        self._modified = True

    def invalidate(self) -> None:
        super().invalidate()
        self._meta = NO_META
        self._modified = True

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._modified = True

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._modified = True

    def _saved(self, revision: str | None, created_at: int | None) -> None:
        """After the storage wrote (or deleted) this session."""
        self._revision = revision
        self._created_at = created_at
        self._modified = False
        self._source = None


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def session_key(prefix: str, namespace: str, session_id: str) -> str:
    """The store key: `{prefix}{applicationId}:{sessionId}`."""
    return f"{prefix}{namespace}:{session_id}"


def _wall_clock() -> float:
    # Looked up at each call: tests (aiohttp-session's own among them) patch `time.time`.
    return time.time()


# `Decoded.problem` of a readable value past its absolute deadline or its max_age (`_decode`).
_PAST_DEADLINE = "past the absolute lifetime"
_PAST_MAX_AGE = "past its max_age since the last change"


@dataclass(frozen=True, slots=True)
class SessionStatus:
    """A session read without sliding, with its remaining lifetimes in whole seconds
    (`None` without a session)."""

    session: StoredSession
    idle_expires_in: int | None
    absolute_expires_in: int | None


def _positive(name: str, value: int | None, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a whole number of seconds >= 1, got {value!r}")


def _backend_of(store: Store) -> tuple[SessionBackend, bool]:
    """(backend, owned: created here and closed by `SessionStorage.close`)."""
    if isinstance(store, str):
        client = make_client(RedisOptions(url=store))
        return RedisBackend(client), True
    if isinstance(store, (aioredis.Redis, RedisCluster)):
        pool = getattr(store, "connection_pool", None)
        kwargs = getattr(pool, "connection_kwargs", {}) if pool is not None else {}
        if kwargs.get("decode_responses") or getattr(store, "decode_responses", False):
            raise ValueError("the Redis client must return bytes: use decode_responses=False")
        return RedisBackend(store), False
    if isinstance(store, (MemoryBackend, RedisBackend)) or all(
        callable(getattr(store, name, None))
        for name in ("get_and_touch", "create", "compare_and_set", "delete", "peek")
    ):
        return store, False
    raise TypeError(
        "SessionStorage needs a redis.asyncio client, a Redis URL or a SessionBackend "
        f"(e.g. MemoryBackend()), got {type(store).__name__}"
    )


class SessionStorage(AbstractStorage):
    """aiohttp-session storage over Redis or memory (see the module docstring and
    docs/sessions.md).

    `store`: a `redis.asyncio.Redis`/`RedisCluster` client (`decode_responses=False`; its
    owner closes it), a Redis URL (the storage makes the client; `close()` closes it), or a
    `SessionBackend` such as `MemoryBackend()` (closed by its owner).
    Options: `key_prefix`, `namespace` (a fixed name or a function of the request),
    `idle_ttl` (seconds; the store TTL of a session without `max_age`), `max_age`
    (aiohttp-session's: cookie Max-Age and store TTL; per session `session.max_age`),
    `absolute_lifetime` (seconds from creation; None: off), the cookie's `cookie_name`,
    `domain`, `path` (or a function of the request), `secure` (None: not set; or a function of
    the request), `httponly`, `samesite`, `refresh_cookie` (re-send the cookie with every save,
    as aiohttp-session does; False: only when it is new or has a max_age); `encryption_keys`
    (Fernet keys, first encrypts, all decrypt), `max_bytes` (the largest serialized session),
    `rotation_tombstone_seconds` (how long a rotated-away id answers 409 `session_rotated`),
    `clock` (wall clock, tests).
    """

    def __init__(
        self,
        store: Store,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        namespace: Namespace = DEFAULT_NAMESPACE,
        idle_ttl: int = DEFAULT_IDLE_TTL,
        max_age: int | None = None,
        absolute_lifetime: int | None = None,
        cookie_name: str = "AIOHTTP_SESSION",
        domain: str | None = None,
        path: CookiePath = "/",
        secure: CookieSecure = None,
        httponly: bool = True,
        samesite: str | None = "Lax",
        refresh_cookie: bool = True,
        encryption_keys: Sequence[str] = (),
        max_bytes: int = 65536,
        rotation_tombstone_seconds: int = DEFAULT_ROTATION_TOMBSTONE_SECONDS,
        clock: Callable[[], float] = _wall_clock,
    ) -> None:
        _positive("idle_ttl", idle_ttl, optional=False)
        _positive("max_age", max_age, optional=True)
        _positive("absolute_lifetime", absolute_lifetime, optional=True)
        _positive("rotation_tombstone_seconds", rotation_tombstone_seconds, optional=False)
        if isinstance(namespace, str) and not _NAMESPACE_RE.fullmatch(namespace):
            raise ValueError(
                f"namespace must be 1-128 characters without ':' or spaces: {namespace!r}"
            )
        super().__init__(
            cookie_name=cookie_name,
            domain=domain,
            max_age=max_age,
            path=path if isinstance(path, str) else "/",
            secure=secure if not callable(secure) else None,
            httponly=httponly,
            samesite=samesite,
        )
        self.backend, self._owns_backend = _backend_of(store)
        self.key_prefix = key_prefix
        self.idle_ttl = idle_ttl
        self._default_max_age = max_age
        # What every read's GETEX sets: a session's own max_age differing from it costs an
        # EXPIRE per read.
        self._default_ttl = max_age if max_age is not None else idle_ttl
        self.absolute_lifetime = absolute_lifetime
        self.rotation_tombstone_seconds = rotation_tombstone_seconds
        self._namespace = namespace
        self._path = path
        self._domain = domain
        self._secure = secure
        self._httponly = httponly
        self._samesite = samesite
        self._refresh_cookie = refresh_cookie
        # aiohttp reads ASCII cookie names only (a non-ASCII one never matches).
        self._cookie_prefix = f"{cookie_name}=" if cookie_name.isascii() else ""
        # Wall clock (created_at is a Unix time shared by every replica); tests may move it.
        self.clock = clock
        self.codec = SessionCodec(
            encryption_keys,
            max_bytes=max_bytes,
            refresh_after=max_age or idle_ttl,
            clock=lambda: self.clock(),
            cache_bytes=DECODE_CACHE_BYTES,
        )
        self._encrypted = self.codec.encrypted

    @classmethod
    def from_options(
        cls, store: Store, options: SessionOptions, *, clock: Callable[[], float] = _wall_clock
    ) -> SessionStorage:
        """The storage `options` describe (the gateway's wiring builds them from its settings;
        `app.main.session_options`)."""
        values = {f.name: getattr(options, f.name) for f in fields(options)}
        return cls(store, clock=clock, **values)

    async def close(self) -> None:
        """Close the Redis client this storage made from a URL (nothing else)."""
        if self._owns_backend:
            await self.backend.close()

    # -- identity ---------------------------------------------------------------------------

    def namespace(self, request: web.Request) -> str:
        """The request's namespace (the `{applicationId}` of the key)."""
        namespace = self._namespace
        return namespace if isinstance(namespace, str) else namespace(request)

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
                    "by a sibling site or by script?): treated as no session (namespace %s)",
                    self.cookie_name,
                    self.namespace(request),
                )
            return None
        return choice

    def key_for(self, request: web.Request, session_id: str) -> str:
        return session_key(self.key_prefix, self.namespace(request), session_id)

    # -- lifetimes --------------------------------------------------------------------------

    def absolute_left(self, created_at: int) -> float:
        """Seconds until the absolute deadline of a session created at `created_at`;
        `math.inf` without an absolute lifetime."""
        if self.absolute_lifetime is None:
            return math.inf
        return created_at + self.absolute_lifetime - self.clock()

    def ttl_for(self, created_at: int, max_age: int | None = None) -> int:
        """The TTL to store with: `max_age` or else the idle TTL, cut to the absolute deadline
        (0: past it)."""
        ttl = max_age if max_age is not None else self.idle_ttl
        left = self.absolute_left(created_at)
        if left <= 0:
            return 0
        if left >= ttl:
            return ttl
        return math.ceil(left)

    @staticmethod
    def reserve_id(session: Session) -> str | None:
        """The id a new session will be stored under (minted now), so that something keyed by
        it (the gateway's rate-limit bucket) can be used before it is created; the id of a
        stored session; None for a session already cleared."""
        if session.new and session.identity is None:
            session.set_new_identity(new_session_id())
        identity = session.identity
        return identity if isinstance(identity, str) else None

    # -- load -------------------------------------------------------------------------------

    def _fresh(self) -> StoredSession:
        return StoredSession(None, data=None, new=True, max_age=self._default_max_age)

    async def new_session(self) -> Session:
        return self._fresh()

    def _decode(self, namespace: str, session_id: str, raw: bytes) -> Decoded:
        """`raw` decoded; its session is None when it cannot be used (see `_drop`). No I/O:
        a readable value costs no coroutine."""
        # The binding matters only to encrypted values (plaintext ones never check it).
        binding = f"{namespace}:{session_id}" if self._encrypted else ""
        decoded = self.codec.decode(raw, binding)
        if decoded.session is None:
            return decoded
        if self.absolute_lifetime is not None and self.absolute_left(decoded.created_at) <= 0:
            return refused(_PAST_DEADLINE)
        max_age = decoded.max_age if decoded.max_age is not None else self._default_max_age
        if max_age is not None and self.clock() - decoded.created > max_age:
            return refused(_PAST_MAX_AGE)
        return decoded

    async def _drop(self, namespace: str, key: str, refusal: Decoded) -> None:
        """After `_decode` refused a value: remove it, unless another replica may be able to
        read it (`keep`)."""
        if refusal.keep:
            log.info(
                "session value not readable here: %s (namespace %s)", refusal.problem, namespace
            )
            return
        if refusal.problem in (_PAST_DEADLINE, _PAST_MAX_AGE):
            log.info("session ended: %s (namespace %s)", refusal.problem, namespace)
        else:
            log.warning("session value removed: %s (namespace %s)", refusal.problem, namespace)
        await self.backend.delete(key)

    def _loaded(self, session_id: str, decoded: Decoded, revision: str) -> StoredSession:
        """A session on `decoded`, which it does not change: the mapping is copied (deeply
        when nested: the codec may hand the same `Decoded` to other requests)."""
        mapping = decoded.session
        assert mapping is not None
        nested = decoded.nested
        session = StoredSession(
            session_id,
            data={"created": decoded.created, "session": copy_json(mapping) if nested else mapping},
            new=False,
            revision=revision,
            created_at=decoded.created_at,
            meta=decoded.meta,
            source=decoded,
        )
        # Set after construction: `Session.__init__` would judge the age itself (`_decode` has).
        max_age = decoded.max_age if decoded.max_age is not None else self._default_max_age
        if max_age is not None:
            session.max_age = max_age
        return session

    async def _reencrypt(
        self, key: str, binding: str, decoded: Decoded, revision: str, ttl: int
    ) -> str:
        """Best effort: store a stale value encrypted under the first key (compare-and-set, so
        a write that got in first wins). The revision the session now has."""
        assert decoded.session is not None
        new_revision = int(revision) + 1
        try:
            encoded = self.codec.encode(
                decoded.session,
                new_revision,
                binding,
                created_at=decoded.created_at,
                created=decoded.created,
                meta=decoded.meta,
                max_age=decoded.max_age,
            )
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
            return self._fresh()
        namespace = self.namespace(request)
        key = session_key(self.key_prefix, namespace, session_id)
        default_ttl = self._default_ttl
        raw = await self.backend.get_and_touch(key, default_ttl)
        if raw is None:
            return self._fresh()
        decoded = self._decode(namespace, session_id, raw)
        if decoded.session is None:
            if decoded.rotated:
                # GETEX just slid the tombstone to the idle TTL: pull it back to its own.
                await self.backend.expire(key, self.rotation_tombstone_seconds)
                raise SessionRotated()
            await self._drop(namespace, key, decoded)
            return self._fresh()
        revision = revision_of(raw)
        if decoded.max_age is None and self.absolute_lifetime is None:
            ttl = default_ttl  # the usual case: what GETEX just set
        else:
            ttl = self.ttl_for(decoded.created_at, decoded.max_age or default_ttl)
        if decoded.stale:
            # Plaintext while encryption is on, or under an older key for a while: encrypt it
            # under the first key now (sets the TTL too).
            binding = f"{namespace}:{session_id}"
            revision = await self._reencrypt(key, binding, decoded, revision, max(ttl, 1))
        elif ttl != default_ttl:
            # GETEX just slid the key to the default TTL: this session's own max_age differs,
            # or its absolute deadline is nearer.
            await self.backend.expire(key, max(ttl, 1))
        return self._loaded(session_id, decoded, revision)

    async def peek_session(self, request: web.Request) -> SessionStatus:
        """The session without sliding it, with its remaining idle and absolute lifetimes.

        One round trip (`peek`); a value past its absolute deadline is deleted (a second one).
        """
        session_id = self.load_cookie(request)
        if session_id is None:
            return SessionStatus(self._fresh(), None, None)
        namespace = self.namespace(request)
        key = session_key(self.key_prefix, namespace, session_id)
        found = await self.backend.peek(key)
        if found is None:
            return SessionStatus(self._fresh(), None, None)
        raw, ttl_left = found
        decoded = self._decode(namespace, session_id, raw)
        if decoded.session is None:
            if decoded.rotated:
                raise SessionRotated()
            await self._drop(namespace, key, decoded)
            return SessionStatus(self._fresh(), None, None)
        absolute = self.absolute_left(decoded.created_at)
        idle = absolute if ttl_left is None else min(ttl_left, absolute)
        return SessionStatus(
            self._loaded(session_id, decoded, revision_of(raw)),
            None if math.isinf(idle) else max(int(idle), 0),
            None if math.isinf(absolute) else max(int(absolute), 0),
        )

    def unread_session(self, request: web.Request) -> StoredSession:
        """A handle on the cookie's session without reading it, for `invalidate()` only (a
        logout needs only the id: one `DEL`, no read)."""
        session_id = self.load_cookie(request)
        if session_id is None:
            return self._fresh()
        return StoredSession(session_id, data=None, new=False, max_age=self._default_max_age)

    # -- save -------------------------------------------------------------------------------

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        """Write a changed session; delete an invalidated (empty) one. Nothing happens for a
        `StoredSession` not changed since it was loaded or last saved.

        Raises `SessionTooLarge`, `SessionConflict` (changed meanwhile: nothing written),
        `SessionEnded` (deleted meanwhile, or past its absolute deadline: not resurrected;
        the cookie expired on it) or `StoreUnavailable`."""
        stored = session if isinstance(session, StoredSession) else None
        if stored is not None and not stored.modified:
            return
        namespace = self.namespace(request)
        meta = stored.meta if stored is not None else NO_META
        in_store = stored.stored if stored is not None else not session.new
        if session.empty and not meta:
            if session.identity is not None and (in_store or not session.new):
                await self._end(session_key(self.key_prefix, namespace, session.identity))
            elif request.get(_AMBIGUITY_LOGGED):
                # Logout with several ids under our name (a planted cookie next to ours): which
                # one is the user's is unknown, so every one named ends (the user's among them;
                # a planted one is the planter's own). Otherwise the user's would outlive it.
                names = named_session_ids(request.headers.getall(hdrs.COOKIE), self.cookie_name)
                for session_id in sorted(names):
                    await self.backend.delete_unless_revision(
                        session_key(self.key_prefix, namespace, session_id), _TOMBSTONE
                    )
            # Also without a stored session: whatever cookie the browser holds is dropped.
            self.expire_cookie(request, response)
            if stored is not None:
                stored._saved(None, None)
            return
        now = self.clock()
        created_at = stored.created_at if stored is not None else None
        if created_at is None:
            created_at = int(now)
        ttl = self.ttl_for(created_at, session.max_age)
        if in_store or not session.new:
            await self._update(request, response, namespace, session, stored, created_at, ttl)
            return
        if ttl <= 0:  # a brand-new session cannot be past its deadline unless the clock jumped
            raise SessionEnded("The session reached its absolute lifetime.")
        session_id = await self._create(
            request, response, namespace, session, created_at, meta, ttl, revision=1
        )
        if session.identity != session_id:
            session.set_new_identity(session_id)  # still `new`, as aiohttp-session leaves it
        if stored is not None:
            stored._saved("1", created_at)

    async def _end(self, key: str) -> None:
        """Delete the session at `key` (a logout), unless a rotation left its tombstone there:
        then raise `SessionRotated` (409, cookie untouched: the browser holds the new id, and
        the session the user meant to end lives on under it). One atomic step, so a logout
        racing the rotation either deletes the session before it is copied (the rotation then
        finds nothing) or meets the tombstone; never removes the tombstone."""
        if await self.backend.delete_unless_revision(key, _TOMBSTONE) == "conflict":
            raise SessionRotated()

    async def _update(
        self,
        request: web.Request,
        response: web.StreamResponse,
        namespace: str,
        session: Session,
        stored: StoredSession | None,
        created_at: int,
        ttl: int,
    ) -> None:
        identity = session.identity
        assert isinstance(identity, str)
        key = session_key(self.key_prefix, namespace, identity)
        if ttl <= 0:
            await self.backend.delete(key)
            raise self._ended(request, "The session reached its absolute lifetime.")
        # A session never read (`unread_session`) has no revision: no stored one matches.
        expected = stored.revision if stored is not None and stored.revision else "-1"
        revision = int(expected) + 1
        max_age = session.max_age
        # Remembered: the next read of this session (a GET after the PATCH) needs no decode.
        encoded = self.codec.encode(
            dict(session),
            revision,
            f"{namespace}:{identity}",
            created_at=created_at,
            created=session.created,
            meta=stored.meta if stored is not None else NO_META,
            max_age=max_age if max_age != self._default_max_age else None,
            remember=True,
        )
        result = await self.backend.compare_and_set(key, expected, encoded, ttl)
        if result == "missing":
            raise self._ended(request, "The session ended (logged out) meanwhile.")
        if result == "conflict":
            raise SessionConflict()
        if stored is not None:
            stored._saved(str(revision), created_at)
        if max_age is not None or self._refresh_cookie:
            # Re-sent as aiohttp-session does (with a max_age: pushes its expiry).
            self.set_cookie(request, response, identity, max_age=max_age)

    def _ended(self, request: web.Request, message: str) -> SessionEnded:
        ended = SessionEnded(message)
        self.expire_cookie(request, ended)
        return ended

    async def _create(
        self,
        request: web.Request,
        response: web.StreamResponse,
        namespace: str,
        session: Session,
        created_at: int,
        meta: Mapping[str, Any],
        ttl: int,
        *,
        revision: int,
        reserved: Any = None,
    ) -> str:
        """Store `session` under a fresh id and set the cookie (SET NX: never overwrites);
        the id. An id reserved in advance (`reserve_id`, or `reserved`) is tried first."""
        mapping = dict(session)
        max_age = session.max_age
        if reserved is None and session.new:
            reserved = session.identity
        for attempt in range(3):
            if attempt == 0 and isinstance(reserved, str) and SESSION_ID_RE.fullmatch(reserved):
                session_id = reserved
            else:
                session_id = new_session_id()
            encoded = self.codec.encode(
                mapping,
                revision,
                f"{namespace}:{session_id}",
                created_at=created_at,
                created=session.created,
                meta=meta,
                max_age=max_age if max_age != self._default_max_age else None,
            )
            key = session_key(self.key_prefix, namespace, session_id)
            if await self.backend.create(key, encoded, ttl):
                self.set_cookie(request, response, session_id, max_age=max_age)
                return session_id
        raise RuntimeError("could not allocate a unique session id")  # 2**-256 odds

    async def rotate(
        self, request: web.Request, response: web.StreamResponse, session: StoredSession
    ) -> StoredSession:
        """Move a stored `session` to a fresh id and kill the old one; the session under its
        new id (the new cookie is set on `response`; make it the request's session).

        1. The session is stored under a fresh id (`SET NX`).
        2. The old key is replaced, blindly and atomically, by a rotation tombstone
           (`replace`: `SET XX GET`, TTL `rotation_tombstone_seconds`), which returns the last
           value any write left there. From then on the old id reads and writes nothing: a
           request carrying it gets 409 `session_rotated` (`SessionRotated`, cookie
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
        assert isinstance(old_id, str) and session.stored and session.revision is not None
        namespace = self.namespace(request)
        old_key = session_key(self.key_prefix, namespace, old_id)
        created_at = session.created_at if session.created_at is not None else int(self.clock())
        ttl = self.ttl_for(created_at, session.max_age)
        if ttl <= 0:
            await self.backend.delete(old_key)
            raise self._ended(request, "The session reached its absolute lifetime.")
        expected = session.revision
        new_revision = int(expected) + 1
        cookie_before = response.cookies.get(self.cookie_name)
        cookie_before = cookie_before.copy() if cookie_before is not None else None

        def restore_cookie() -> None:
            if cookie_before is None:
                response.cookies.pop(self.cookie_name, None)
            else:
                response.cookies[self.cookie_name] = cookie_before

        new_id = await self._create(
            request,
            response,
            namespace,
            session,
            created_at,
            session.meta,
            ttl,
            revision=new_revision,
            reserved=new_session_id(),
        )
        new_key = session_key(self.key_prefix, namespace, new_id)
        marker = tombstone(new_session_id())
        try:
            last = await self.backend.replace(old_key, marker, self.rotation_tombstone_seconds)
        except BaseException:
            await self._discard(new_key)
            restore_cookie()
            raise
        mapping, created, meta = dict(session), session.created, session.meta
        max_age = session.max_age
        if last is None or (last != marker and revision_of(last) != expected):
            latest = None
            if last is not None and last != marker:
                latest = self._decode(namespace, old_id, last)
            if latest is None or latest.session is None:
                await self._discard(new_key)
                restore_cookie()
                if latest is not None and latest.rotated:
                    raise SessionRotated()
                raise self._ended(request, "The session ended (logged out) meanwhile.")
            # A write landed after this request loaded the session: carry it over (the new
            # key is known only to this request, so this compare-and-set cannot lose).
            mapping, created, meta = copy_json(latest.session), latest.created, latest.meta
            created_at = latest.created_at
            if latest.max_age is not None:
                max_age = latest.max_age
            encoded = self.codec.encode(
                mapping,
                new_revision + 1,
                f"{namespace}:{new_id}",
                created_at=created_at,
                created=created,
                meta=meta,
                max_age=max_age if max_age != self._default_max_age else None,
            )
            result = await self.backend.compare_and_set(new_key, str(new_revision), encoded, ttl)
            if result != "ok":  # expired within the request: as if deleted meanwhile
                restore_cookie()
                raise self._ended(request, "The session ended (logged out) meanwhile.")
            new_revision += 1
        moved = StoredSession(
            new_id,
            data={"created": created, "session": mapping},
            new=False,
            revision=str(new_revision),
            created_at=created_at,
            meta=meta,
        )
        if max_age is not None:
            moved.max_age = max_age
        return moved

    async def _discard(self, key: str) -> None:
        """Best effort: remove a key this request created but must not keep."""
        try:
            await self.backend.delete(key)
        except Exception:  # its TTL removes it anyway
            log.warning("could not remove an abandoned rotated session key", exc_info=True)

    # -- cookie -----------------------------------------------------------------------------

    def cookie_path(self, request: web.Request) -> str:
        path = self._path
        return path if isinstance(path, str) else path(request)

    def cookie_secure(self, request: web.Request) -> bool | None:
        secure = self._secure
        return secure(request) if callable(secure) else secure

    def set_cookie(
        self,
        request: web.Request,
        response: web.StreamResponse,
        value: str,
        *,
        max_age: int | None = None,
    ) -> None:
        """Set the session cookie; with `max_age`, also Max-Age and Expires (as
        aiohttp-session's `save_cookie` does)."""
        expires = None
        if max_age is not None:
            expires = time.strftime("%a, %d-%b-%Y %T GMT", time.gmtime(time.time() + max_age))
        response.set_cookie(
            self.cookie_name,
            value,
            path=self.cookie_path(request),
            domain=self._domain,
            max_age=max_age,
            expires=expires,
            secure=self.cookie_secure(request),
            httponly=self._httponly,
            samesite=self._samesite,
        )

    def expire_cookie(self, request: web.Request, response: web.StreamResponse) -> None:
        response.del_cookie(
            self.cookie_name,
            path=self.cookie_path(request),
            domain=self._domain,
            secure=self.cookie_secure(request),
            httponly=self._httponly,
            samesite=self._samesite,
        )
