"""`StoredSession`: aiohttp-session's `Session` plus what the store keeps beside the mapping
(revision, `created_at`, metadata); `SessionStatus`: a session read without sliding."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from aiohttp_session import Session

from app.sessions.codec import NO_META, Decoded

__all__ = ["SessionStatus", "StoredSession"]


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


@dataclass(frozen=True, slots=True)
class SessionStatus:
    """A session read without sliding, with its remaining lifetimes in whole seconds
    (`None` without a session)."""

    session: StoredSession
    idle_expires_in: int | None
    absolute_expires_in: int | None
