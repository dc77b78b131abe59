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

import logging
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from aiohttp import hdrs, web
from aiohttp_session import Session

from app.sessions.backend import revision_of
from app.sessions.codec import NO_META, TOMBSTONE_REVISION, copy_json, tombstone
from app.sessions.conflicts import SessionConflict, SessionEnded, SessionRotated
from app.sessions.cookies import SESSION_ID_RE, named_session_ids
from app.sessions.ids import new_session_id, session_key
from app.sessions.options import SessionOptions
from app.sessions.storage_base import Store, wall_clock
from app.sessions.storage_reads import SessionReads
from app.sessions.stored_session import StoredSession

log = logging.getLogger(__name__)

# A rotation tombstone's revision (`tombstone`): a logout never deletes it (`_end`).
_TOMBSTONE = str(TOMBSTONE_REVISION)

__all__ = ["SessionStorage"]


class SessionStorage(SessionReads):
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

    @classmethod
    def from_options(
        cls, store: Store, options: SessionOptions, *, clock: Callable[[], float] = wall_clock
    ) -> SessionStorage:
        """The storage `options` describe (the gateway's wiring builds them from its settings;
        `app.main.session_options`)."""
        values = {f.name: getattr(options, f.name) for f in fields(options)}
        return cls(store, clock=clock, **values)

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
            elif self.cookie_was_ambiguous(request):
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
