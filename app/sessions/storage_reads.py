"""`SessionReads`: how `SessionStorage` loads a session: `load_session` (one `GETEX` that
slides the TTL), `peek_session` (no slide), `unread_session` (no read), and what a loaded value
may cost (a stale value re-encrypted, a refused one removed). Writes: `app.sessions.storage`.
"""

from __future__ import annotations

import logging
import math

from aiohttp import web
from aiohttp_session import Session

from app.sessions.backend import StoreUnavailable, revision_of
from app.sessions.codec import Decoded, SessionTooLarge, copy_json, refused
from app.sessions.conflicts import SessionRotated
from app.sessions.ids import session_key
from app.sessions.storage_base import StorageBase
from app.sessions.stored_session import SessionStatus, StoredSession

log = logging.getLogger(__name__)

# `Decoded.problem` of a readable value past its absolute deadline or its max_age (`_decode`).
_PAST_DEADLINE = "past the absolute lifetime"
_PAST_MAX_AGE = "past its max_age since the last change"


class SessionReads(StorageBase):
    """The read path of `SessionStorage`."""

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
