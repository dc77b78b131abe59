"""The gateway's own errors and their one JSON envelope.

Every error the gateway itself produces looks like
`{"error": {"code": "<snake_case>", "message": "...", "request_id": "..."}}` with
`Cache-Control: no-store`. Upstream errors are never rewritten: they pass through as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from app.keys import REQUEST_ID_KEY


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


def store_full(retry_after: int = 1) -> ApiError:
    """The session store refused a write for lack of memory: 503, the old value is kept."""
    return ApiError(
        503,
        "session_store_full",
        "The session store is full; the session was not changed.",
        headers={"Retry-After": str(retry_after)},
    )


def store_unavailable(retry_after: int = 1) -> ApiError:
    """The session store did not answer in time: 503, the cookie is kept."""
    return ApiError(
        503,
        "session_store_unavailable",
        "The session store is unavailable; retry shortly.",
        headers={"Retry-After": str(retry_after)},
    )
