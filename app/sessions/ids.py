"""Session ids and store keys: the storage mints every id (never the client), 256 bits.

Ids are validated against `app.sessions.cookies.SESSION_ID_RE` before any store call.
"""

from __future__ import annotations

import secrets

__all__ = ["new_session_id", "session_key"]


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def session_key(prefix: str, namespace: str, session_id: str) -> str:
    """The store key: `{prefix}{applicationId}:{sessionId}`."""
    return f"{prefix}{namespace}:{session_id}"
