"""The gateway's own errors and their one JSON envelope.

Every error the gateway itself produces looks like
`{"error": {"code": "<snake_case>", "message": "...", "request_id": "..."}}` with
`Cache-Control: no-store`. Upstream errors are never rewritten: they pass through as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from aiohttp import web

from app.keys import REQUEST_ID_KEY
from app.sessions.backend import StoreFull, StoreUnavailable


class ApiError(Exception):
    """A failure the gateway answers itself. Raise it anywhere below a handler."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class FixedError(ApiError):
    """An `ApiError` whose status, code, message (and headers) are those of its class, so each
    code is spelled once: subclasses set `status`, `code`, `message` (`default_headers`).
    `detail` says more, for the log only."""

    default_headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, detail: str = "") -> None:
        super().__init__(self.status, self.code, self.message, headers=self.default_headers)
        self.detail = detail


class BodyTooLarge(FixedError):
    """A request body over its cap (declared, or counted as it arrives)."""

    status, code = 413, "body_too_large"
    message = "The request body is too large."


class BodyTimeout(FixedError):
    """A request body that paused too long, or was not complete in time."""

    status, code = 408, "body_timeout"
    message = "The request body did not arrive in time."


def error_response(
    request: web.BaseRequest,
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """The JSON envelope for one of our own errors."""
    request_id = request.get(REQUEST_ID_KEY, "")
    response = web.json_response(
        {"error": {"code": code, "message": message, "request_id": request_id}},
        status=status,
        headers=headers,
    )
    response.headers["Cache-Control"] = "no-store"
    return response


def _store_refusal(code: str, message: str, retry_after: int) -> ApiError:
    """A 503 of the session store, with `Retry-After: retry_after`."""
    return ApiError(503, code, message, headers={"Retry-After": str(retry_after)})


def store_full(retry_after: int = 1) -> ApiError:
    """The session store refused a write for lack of memory: 503, the old value is kept."""
    message = "The session store is full; the session was not changed."
    return _store_refusal("session_store_full", message, retry_after)


def store_unavailable(retry_after: int = 1) -> ApiError:
    """The session store did not answer in time: 503, the cookie is kept."""
    message = "The session store is unavailable; retry shortly."
    return _store_refusal("session_store_unavailable", message, retry_after)


def store_error(err: StoreUnavailable) -> ApiError:
    """The answer to a session store failure: 503 `session_store_full` for `StoreFull`, else
    503 `session_store_unavailable`."""
    return store_full() if isinstance(err, StoreFull) else store_unavailable()
