"""The storage's 409 answers: `SessionEnded`, `SessionConflict`, `SessionRotated`.

Each is a `web.HTTPConflict` with a JSON body, so aiohttp-session's own `session_middleware`
answers it as it is, never as a 500 (`app.sessions.storage` raises them).
"""

from __future__ import annotations

import json

from aiohttp import web

__all__ = ["SessionConflict", "SessionEnded", "SessionRotated"]


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
