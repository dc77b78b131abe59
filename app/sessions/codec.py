"""The stored value of a session: JSON with a format version and a revision, optionally
encrypted and authenticated.

Plaintext (no encryption keys)::

    {"v":1,"r":<revision>,"created":<int>,"data":{...},"gw":{"created_at":<int>,...}}

Encrypted::

    {"v":1,"r":<revision>,"enc":"<Fernet token>"}

where the token decrypts to `{"k":"<applicationId>:<sessionId>","created":...,"data":{...},
"gw":{...}}`.

- `data` is the session's own mapping: every top-level key a handler set
  (`session["n"] = 1`; for the gateway, the browser-visible document of its session API), and
  `created` is aiohttp-session's `Session.created` (the time of the last change).
- `gw` is what the storage keeps beside that mapping, out of a handler's reach: `created_at`
  (when the session was first stored; the absolute lifetime counts from it), `max_age` (only
  when a handler set a per-session `Session.max_age`), and the metadata fields set with
  `StoredSession.set_meta` (the gateway's `conversation_id`).
- Compatible both ways with the values of releases before the storage became public (the same
  `data`/`gw` layout, without `created`): their values load as they are (`created` is then
  `created_at`), and their replicas read this release's values during a rolling deploy (they
  ignore `created`), so neither an upgrade nor a rollback logs anyone out.
- `r` always comes second, right after `v`: the compare-and-set script reads it with a pattern
  on the first bytes (`app.sessions.backend.revision_of`), never by parsing (or decrypting)
  the value. A value without `r` (written before revisions existed) has revision 0.
- Encryption is `cryptography`'s `MultiFernet`: the first key encrypts, every key decrypts.
  Keys change in three deploys (docs/security.md): add the new key second everywhere, then
  move it first, then drop the old one; so no replica meets a value it cannot read. Fernet
  is AES-128-CBC with a random IV plus HMAC-SHA256 (encrypt-then-MAC) under a 256-bit key: a
  Redis dump reveals nothing but sizes and revisions, and a changed byte fails the MAC.
  Chosen over AES-GCM because a random 96-bit GCM nonce caps one key at about 2**32 writes
  before nonce reuse becomes a risk (a busy gateway reaches that in weeks), Fernet has no
  such cliff, and "first encrypts, all decrypt" is exactly MultiFernet.
- `k` binds the ciphertext to its own key: someone who can write to Redis cannot copy one
  session's (valid) ciphertext under another session id, e.g. their own.
- Rollout without logging anyone out: with keys set, a plaintext value (stored before
  encryption was switched on) is still read, flagged `stale` so the storage re-encrypts it at
  once (and any write encrypts it anyway). So is a token only an older key opens, once it is
  one idle TTL old (see `SessionCodec.__init__`): after the first key changed, every active
  session moves to it within two idle TTLs, written or only read. A well-formed token that
  no key of this gateway opens (a key only other replicas have yet, a retired key, or a
  tampered token: Fernet cannot tell them apart), or a token while encryption is off here,
  counts as no session but is `kept`: another replica may read it, and its TTL removes it
  otherwise. Values that are corrupt (a malformed token included) or bound to another
  session are removed.
  The price of reading plaintext: someone who can write to Redis can plant a plaintext
  session (with encryption on, a forged token is refused). Redis write access is needed for
  that, which already allows deleting or replaying any session.
- Rotation tombstone: `{"v":1,"r":1000000000000000000,"rotated":"<nonce>"}` is what a session
  id rotation leaves at the old id for `rotation_tombstone_seconds` (`tombstone`). It holds no
  data (plaintext even with encryption
  on) and decodes as a `Decoded` with `rotated` set: the storage answers 409
  `session_rotated` to a request carrying that id and never removes it. Its revision is one no
  session reaches (10**18 writes), so a write that loaded the session before the rotation
  always loses its compare-and-set against it (Redis script and memory store alike: the same
  revision pattern). Nothing a handler stores can produce it: the session's mapping is always
  nested under `data`.
- `SESSION_MAX_BYTES` limits the plaintext serialization (what the browser controls), so
  turning encryption on does not change which writes are accepted; the stored ciphertext is
  about 4/3 of it plus ~100 bytes.

Over ~400 lines because this docstring (a sixth of it) states the stored format, which the
code reads and writes both ways: one concern, kept in one place.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when keys are set: the bindings are ~8.6 MB of RSS per replica
    from cryptography.fernet import Fernet, MultiFernet

FORMAT_VERSION = 1
TOMBSTONE_REVISION = 10**18
ROTATED = "rotated"
DATA = "data"  # the session's own mapping
CREATED = "created"  # aiohttp-session's `Session.created`
GATEWAY = "gw"  # the storage's fields beside the mapping
CREATED_AT = "created_at"
MAX_AGE = "max_age"
# Fields of `gw` that are the storage's own, not metadata (`StoredSession.meta`).
_RESERVED = frozenset({CREATED_AT, MAX_AGE})
NO_META: Mapping[str, Any] = MappingProxyType({})


class SessionTooLarge(Exception):
    """The serialized session would exceed `max_bytes`; nothing was written."""


@dataclass(slots=True)
class Decoded:
    """A stored value, read: the session's fields, or why it was refused (`session` None).

    Not frozen (a frozen dataclass sets each field through `object.__setattr__`: one is made
    per session read); nothing changes it after `decode` but `json_body`, a memo. The codec may
    hand the same `Decoded` to several requests: callers copy `session` (see `nested`) and
    `meta` before changing them."""

    session: dict[str, Any] | None
    created_at: int = 0
    created: int = 0
    meta: Mapping[str, Any] = field(default_factory=lambda: NO_META)
    max_age: int | None = None
    # Some value of `session` is a dict or list: a copy handed to a request must be deep
    # (`copy_json`), or an in-place change would reach the cache.
    nested: bool = False
    problem: str = ""
    # Refused here, but possibly readable by another replica: count as no session, keep it.
    keep: bool = False
    # Read, but stored in plaintext while keys are set, or under an older key for longer than
    # `refresh_after` seconds: re-encrypt it (under the first key).
    stale: bool = False
    # Opened by an older key: `stale` depends on the token's age (the clock), so this verdict
    # may not be reused later (`SessionCodec.decode`'s cache).
    aging: bool = False
    # A rotation tombstone (`tombstone`): the id was rotated away; keep it, answer 409.
    rotated: bool = False
    # `session` as JSON (`StoredSession.as_json`), kept by the first read that needs it: a
    # value decoded once is also serialized for an answer once.
    json_body: bytes | None = None


def refused(problem: str, *, keep: bool = False) -> Decoded:
    return Decoded(None, problem=problem, keep=keep)


# What `json.dumps(value, separators=(",", ":"), ensure_ascii=False)` uses, built once (with
# those arguments `json.dumps` builds a new encoder per call).
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _dumps(value: object) -> bytes:
    return _encode_json(value).encode("utf-8")


def _loads_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


_CONTAINERS = frozenset({dict, list})


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON value (dicts, lists, scalars): much cheaper than `copy.deepcopy`
    (scalars are not even visited by a call)."""
    kind = type(value)
    if kind is dict:
        return {k: copy_json(v) if type(v) in _CONTAINERS else v for k, v in value.items()}
    if kind is list:
        return [copy_json(v) if type(v) in _CONTAINERS else v for v in value]
    return value


def is_nested(session: Mapping[str, Any]) -> bool:
    """True when a value of `session` is a dict or list (see `Decoded.nested`)."""
    return not _CONTAINERS.isdisjoint(map(type, session.values()))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fields(container: dict[str, Any]) -> Decoded | None:
    """The session fields of a decoded value (the plaintext object, or the decrypted inner
    one), or None when they are malformed."""
    gateway = container.get(GATEWAY)
    session = container.get(DATA)
    if not isinstance(session, dict) or not isinstance(gateway, dict):
        return None
    created_at = gateway.get(CREATED_AT)
    # Every value this storage writes carries created_at (the absolute lifetime counts from
    # it): a value without one was not written by us.
    if not isinstance(created_at, int) or isinstance(created_at, bool):
        return None
    # Absent from values of earlier releases: the session was then last changed at most when
    # it was created, as far as anyone can tell.
    created = container.get(CREATED, created_at)
    max_age = gateway.get(MAX_AGE)
    if not isinstance(created, int) or isinstance(created, bool):
        return None
    if max_age is not None and (not _is_int(max_age) or max_age < 1):
        return None
    meta: Mapping[str, Any] = NO_META
    if len(gateway) > 1 + (max_age is not None):
        meta = {k: v for k, v in gateway.items() if k not in _RESERVED}
    return Decoded(session, created_at, created, meta, max_age, is_nested(session))


def _gateway_fields(
    created_at: int, meta: Mapping[str, Any], max_age: int | None
) -> dict[str, Any]:
    gateway = {CREATED_AT: created_at}
    if meta:
        gateway.update((k, v) for k, v in meta.items() if k not in _RESERVED)
    if max_age is not None:
        gateway[MAX_AGE] = max_age
    return gateway


def tombstone(nonce: str) -> bytes:
    """The value a rotation leaves at the old id (see the module docstring); `nonce` (URL-safe
    characters) makes each rotation's tombstone its own, so a retried write recognises it."""
    return _dumps({"v": FORMAT_VERSION, "r": TOMBSTONE_REVISION, ROTATED: nonce})


# A Fernet token: version byte 0x80, 8-byte timestamp, 16-byte IV, AES-CBC blocks, 32-byte HMAC.
_FERNET_OVERHEAD = 1 + 8 + 16 + 32


def _well_formed_token(token: str) -> bool:
    """True when `token` has a Fernet token's shape (whatever key made it)."""
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii"))
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return False
    body = len(raw) - _FERNET_OVERHEAD
    return raw[:1] == b"\x80" and body >= 16 and body % 16 == 0


class SessionCodec:
    """Encodes and decodes stored session values (see the module docstring)."""

    def __init__(
        self,
        encryption_keys: Sequence[str] = (),
        *,
        max_bytes: int = 65536,
        refresh_after: float = 3600.0,
        clock: Callable[[], float] = time.time,
        cache_bytes: int = 0,
    ) -> None:
        fernets: list[Fernet] = []
        self._fernet: MultiFernet | None = None
        if encryption_keys:
            from cryptography.fernet import Fernet, MultiFernet

            fernets = [Fernet(key.encode("ascii")) for key in encryption_keys]
            self._fernet = MultiFernet(fernets)
        # The first key alone, and the older ones: a token only an older key opens is read and
        # flagged `stale` once it is `refresh_after` seconds old (the idle TTL), so after a key
        # rotation every active session moves to the new key within two idle TTLs, even one
        # that is only read. Fresher tokens are not rewritten: during a rolling deploy, replicas
        # whose first keys differ would otherwise re-encrypt the same session back and forth.
        self._first = fernets[0] if fernets else None
        self._older = MultiFernet(fernets[1:]) if len(fernets) > 1 else None
        self._refresh_after = refresh_after
        self._clock = clock
        self.max_bytes = max_bytes
        # Recently decoded values (see `decode`): stored value (with its binding when
        # encrypted) -> its `Decoded`, at most `cache_bytes` of stored values in all (0: off).
        self._cache: dict[object, Decoded] = {}
        self._cache_size = 0
        self._cache_bytes = cache_bytes

    @property
    def encrypted(self) -> bool:
        return self._fernet is not None

    def encode(
        self,
        session: Mapping[str, Any],
        revision: int,
        binding: str,
        *,
        created_at: int,
        created: int | None = None,
        meta: Mapping[str, Any] = NO_META,
        max_age: int | None = None,
        remember: bool = False,
    ) -> bytes:
        """The stored bytes of a session whose mapping is `session`, at
        `revision`, bound to `binding` when encrypted. `created` (aiohttp-session's
        `Session.created`) defaults to `created_at`; `meta` fields named `created_at` or
        `max_age` are the storage's own and are not stored.

        `remember`: also keep what `decode` will make of these bytes (with a cache), so the
        next read of a value just written is not decoded; the mapping is copied (deeply when
        nested: the caller may change it in place afterwards).
        Raises `SessionTooLarge` when the plaintext serialization exceeds `max_bytes`.
        """
        if created is None:
            created = created_at
        gateway = {CREATED_AT: created_at}
        if meta or max_age is not None:
            gateway = _gateway_fields(created_at, meta, max_age)
        plain = _dumps(
            {
                "v": FORMAT_VERSION,
                "r": revision,
                CREATED: created,
                DATA: session,
                GATEWAY: gateway,
            }
        )
        if len(plain) > self.max_bytes:
            raise SessionTooLarge(f"session is {len(plain)} bytes; the limit is {self.max_bytes}")
        if self._fernet is None:
            stored = plain
            key: object = stored
        else:
            inner = {"k": binding, CREATED: created, DATA: session, GATEWAY: gateway}
            token = self._fernet.encrypt(_dumps(inner))
            stored = _dumps({"v": FORMAT_VERSION, "r": revision, "enc": token.decode("ascii")})
            key = (binding, stored)
        if remember and self._cache_bytes:
            nested = is_nested(session)
            kept = Decoded(
                copy_json(session) if nested else dict(session),
                created_at,
                created,
                {k: v for k, v in gateway.items() if k not in _RESERVED} if meta else NO_META,
                max_age,
                nested,
            )
            self._remember(key, len(stored), kept)
        return stored

    def decode(self, raw: bytes, binding: str) -> Decoded:
        """The session fields in `raw`, or a `Decoded` whose `session` is None for a value
        that must count as no session (corrupt, unknown version, refused plaintext,
        undecryptable, misplaced).

        With a cache (`cache_bytes`), a value decoded (and decrypted) before is not decoded
        again: the same `Decoded` is returned, so callers must not change its mapping (or
        anything in it). Only readable, non-stale results not opened by an older key are kept
        (whether such a token is stale depends on the clock; a stale one is rewritten at once
        anyway); the key is the exact stored bytes, plus the binding when encrypted (it is
        checked against the value)."""
        if not self._cache_bytes:
            return self._decode(raw, binding)
        key: object = raw if self._fernet is None else (binding, raw)
        decoded = self._cache.get(key)
        if decoded is None:
            decoded = self._decode(raw, binding)
            if decoded.session is not None and not decoded.stale and not decoded.aging:
                self._remember(key, len(raw), decoded)
        return decoded

    def _remember(self, key: object, size: int, decoded: Decoded) -> None:
        if size > self._cache_bytes // 64:
            return  # a large value would crowd out many small ones
        if self._cache_size + size > self._cache_bytes:
            # Full: start over (bounded and cheap; active sessions come back at once).
            self._cache.clear()
            self._cache_size = 0
        self._cache[key] = decoded
        self._cache_size += size

    def _decode(self, raw: bytes, binding: str) -> Decoded:
        value = _loads_object(raw)
        if value is None or value.get("v") != FORMAT_VERSION:
            return refused("corrupt value or unknown format version")
        if ROTATED in value:
            return Decoded(None, problem="the session id was rotated", rotated=True)
        token = value.get("enc")
        if token is None:
            fields = _fields(value)
            if fields is None:
                return refused("corrupt value")
            fields.stale = self._fernet is not None
            return fields
        if not isinstance(token, str) or not _well_formed_token(token):
            return refused("corrupt value: malformed token")
        if self._fernet is None:
            return refused(
                "encrypted value, but SESSION_ENCRYPTION_KEYS is not set here", keep=True
            )
        opened = self._decrypt(token.encode("ascii"))
        if opened is None:
            return refused(
                "no key of this gateway opens the value (a key it lacks, a retired key, "
                "or tampered); left in place",
                keep=True,
            )
        inner_raw, stale, aging = opened
        inner = _loads_object(inner_raw)
        if inner is None:
            return refused("corrupt encrypted value")
        if inner.get("k") != binding:
            return refused("encrypted value belongs to another session (copied)")
        fields = _fields(inner)
        if fields is None:
            return refused("corrupt encrypted value")
        fields.stale = stale
        fields.aging = aging
        return fields

    def _decrypt(self, token: bytes) -> tuple[bytes, bool, bool] | None:
        """(plaintext, stale, opened by an older key) for a token one of the keys opens, else
        None."""
        from cryptography.fernet import InvalidToken

        assert self._first is not None
        try:
            return self._first.decrypt(token), False, False
        except InvalidToken:
            if self._older is None:
                return None
        try:
            plain = self._older.decrypt(token)
        except InvalidToken:
            return None
        # Bytes 1-8 of a Fernet token: its creation time (authenticated by the MAC just checked).
        written = int.from_bytes(base64.urlsafe_b64decode(token)[1:9], "big")
        return plain, self._clock() - written >= self._refresh_after, True
