"""The agent proxy's own errors, one type per code. Raised where they happen, rendered to the
JSON envelope in one place (`render` in app/proxy/handler.py, which also keeps a session cookie
already set and closes the connection when a body may be left unread). After the response
started they end it instead (app/proxy/relay.py: `event: error` with the same code and message,
or an abort).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from app.errors import FixedError

# Methods the proxy sends upstream (the `Allow` of a 405).
PROXIED_METHODS_ALLOW = "GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE"


class WebSocketNotSupported(FixedError):
    status, code = 501, "websocket_not_supported"
    message = "WebSocket upgrades are not proxied; use HTTP (SSE)."


class MethodNotProxied(FixedError):
    """TRACE, TRACK, CONNECT (app/proxy/handler.py `NEVER_PROXIED_METHODS`)."""

    status, code = 405, "method_not_allowed"
    message = "This method is not proxied."
    default_headers: ClassVar[Mapping[str, str]] = {"Allow": PROXIED_METHODS_ALLOW}


class ShuttingDown(FixedError):
    """Open streams were told to stop (the shutdown timeout passed)."""

    status, code = 503, "shutting_down"
    message = "This instance is shutting down; retry."
    default_headers: ClassVar[Mapping[str, str]] = {"Retry-After": "1"}


class InvalidPath(FixedError):
    """The agent path could escape the upstream base (app/proxy/urls.py)."""

    status, code = 400, "invalid_path"
    message = "The agent path is not allowed."


class InvalidHeader(FixedError):
    status, code = 400, "invalid_header"
    message = "A request header has characters that cannot be forwarded."


class UpstreamTimeout(FixedError):
    """No response headers within the application's `connect_timeout_seconds`."""

    status, code = 504, "upstream_timeout"
    message = "The agent service did not answer in time."


class UpstreamUnavailable(FixedError):
    status, code = 502, "upstream_unavailable"
    message = "The agent service is unavailable."


class UpstreamProtocolError(FixedError):
    """An answer that is not valid HTTP, or a status that is not final (101 ...)."""

    status, code = 502, "upstream_protocol_error"
    message = "The agent service sent an invalid response."


class UpstreamRedirectNotAllowed(FixedError):
    """A redirect to another path of this gateway than the application's own."""

    status, code = 502, "upstream_redirect_not_allowed"
    message = "The agent service redirected to another part of this site."


class UpstreamStreamError(FixedError):
    """The upstream's body broke off (reset, truncated, bad framing): only after the start."""

    status, code = 502, "upstream_stream_error"
    message = "The agent service stream broke off."


class UpstreamIdleTimeout(FixedError):
    """No upstream byte for `idle_timeout_seconds`: only after the start."""

    status, code = 504, "upstream_idle_timeout"
    message = "The agent service sent nothing for too long."
