"""`StorageBase`: what `SessionStorage` is built on: its options, the store it talks to, the
request's namespace and store key, the session lifetimes, and the session cookie (reading the
id from the `Cookie` header, setting and expiring it). Reads: `app.sessions.storage_reads`;
writes and rotation: `app.sessions.storage`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
from aiohttp import hdrs, web
from aiohttp_session import AbstractStorage, Session
from redis.asyncio.cluster import RedisCluster

from app.sessions.backend import SessionBackend
from app.sessions.codec import SessionCodec
from app.sessions.cookies import Ambiguous, choose_session_id
from app.sessions.ids import new_session_id, session_key
from app.sessions.memory import MemoryBackend
from app.sessions.options import (
    DEFAULT_IDLE_TTL,
    DEFAULT_KEY_PREFIX,
    DEFAULT_NAMESPACE,
    DEFAULT_ROTATION_TOMBSTONE_SECONDS,
    CookiePath,
    CookieSecure,
    Namespace,
)
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import RedisOptions, make_client

log = logging.getLogger(__name__)

_SESSION_ID_AT = re.compile(r"[A-Za-z0-9_-]{43}")  # SESSION_ID_RE without anchors (for `pos`)
# Set on a request once its ambiguous session cookies were logged (once per request).
_AMBIGUITY_LOGGED = web.RequestKey("session_cookie_ambiguity_logged", bool)
_NAMESPACE_RE = re.compile(r"^[^\s:]{1,128}$")

# Stored values the codec keeps decoded (`SessionCodec.decode`): about 2,000 sessions of 250
# bytes, a few MB of memory at most; values over 1/64 of it are never kept.
DECODE_CACHE_BYTES = 512 * 1024

Store = SessionBackend | aioredis.Redis | RedisCluster | str


def wall_clock() -> float:
    # Looked up at each call: tests (aiohttp-session's own among them) patch `time.time`.
    return time.time()


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


class StorageBase(AbstractStorage):
    """The options, store, namespace, lifetimes and cookie of `SessionStorage` (whose
    docstring lists the options)."""

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
        clock: Callable[[], float] = wall_clock,
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

    @staticmethod
    def cookie_was_ambiguous(request: web.Request) -> bool:
        """Whether `load_cookie` found several distinct ids under our name in this request."""
        return bool(request.get(_AMBIGUITY_LOGGED))

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
