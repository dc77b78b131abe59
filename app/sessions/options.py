"""`SessionOptions`: everything a `SessionStorage` is configured with, as one value.

The session package depends on this, never on the gateway's configuration: the wiring place
(`app.main.session_options`) builds it from the settings, and decides there what needs the
gateway's other concerns (whether the cookie is Secure behind trusted proxies, the per-application
namespace and cookie path); `SessionStorage.from_options(store, options)` takes it. A plain
application passes the same options as keywords (`SessionStorage(store, key_prefix=…)`);
docs/sessions.md lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

DEFAULT_KEY_PREFIX = "agent:sess:"
DEFAULT_NAMESPACE = "default"
DEFAULT_IDLE_TTL = 3600
DEFAULT_ROTATION_TOMBSTONE_SECONDS = 60

# A fixed name, or a function of the request (the gateway: the application id).
Namespace = str | Callable[[web.Request], str]
CookiePath = str | Callable[[web.Request], str]
# None: the attribute is not set; a function: decided per request (e.g. by the scheme the
# client used, behind a TLS-terminating proxy).
CookieSecure = bool | None | Callable[[web.Request], bool]


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOptions:
    """A `SessionStorage`'s options, with its defaults (their meaning: `SessionStorage`)."""

    key_prefix: str = DEFAULT_KEY_PREFIX
    namespace: Namespace = DEFAULT_NAMESPACE
    idle_ttl: int = DEFAULT_IDLE_TTL
    max_age: int | None = None
    absolute_lifetime: int | None = None
    cookie_name: str = "AIOHTTP_SESSION"
    domain: str | None = None
    path: CookiePath = "/"
    secure: CookieSecure = None
    httponly: bool = True
    samesite: str | None = "Lax"
    refresh_cookie: bool = True
    encryption_keys: Sequence[str] = ()
    max_bytes: int = 65536
    rotation_tombstone_seconds: int = DEFAULT_ROTATION_TOMBSTONE_SECONDS
