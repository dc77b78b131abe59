"""What to check when Redis refuses the gateway at start: the likely cause, named from the error.

`python -m app` prints `cannot use Redis at REDIS_URL=... (<error>): <hint>`. The error text is
the store's own (`StoreUnavailable`, which quotes redis-py's exception type and message, and for
a deadline the error of the attempt before it); the hint is chosen from it here, first match
wins, with the generic "running? reachable? firewall?" only when nothing more precise fits.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urlsplit

GENERIC_HINT = (
    "verify Redis is running and reachable, check REDIS_URL is correct, and ensure no "
    "firewall blocks the connection (README: Troubleshooting)"
)


def _database(url: str) -> str:
    path = urlsplit(url).path.strip("/")
    return path or "0"


def _address(url: str) -> str:
    """`host:port` of `url`, or its hosts as written when it names several
    (`redis+cluster://a:1,b:2`); never raises."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    try:
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port or 6379}"
    except ValueError:  # several hosts, or a port that is not a number
        return netloc


# (pattern in the error text, hint built from REDIS_URL); case-insensitive, first match wins.
_RULES: tuple[tuple[re.Pattern[str], Callable[[str], str]], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), hint)
    for pattern, hint in (
        (
            r"unknown command .?SENTINEL",
            lambda url: (
                "REDIS_URL is redis+sentinel:// but the host(s) in it answer as a plain "
                "Redis server, not a Sentinel (Sentinels usually listen on 26379): point it at the "
                "Sentinels, or use redis://host:port/db for a single server"
            ),
        ),
        (
            r"cluster mode is not enabled",
            lambda url: (
                "REDIS_URL is redis+cluster:// but the server is not a cluster node: "
                "use redis://host:port/db for a single server"
            ),
        ),
        (
            r"called without any password configured",
            lambda url: (
                "REDIS_URL carries a password but the server has none set for that "
                "user: remove it from REDIS_URL, or set requirepass / an ACL user on the server"
            ),
        ),
        (
            r"invalid username-password pair|WRONGPASS",
            lambda url: (
                "the password (or user name) in REDIS_URL is wrong: compare it with the "
                'server\'s requirepass or ACL user (redis-cli -u "$REDIS_URL" ping says the same)'
            ),
        ),
        (
            r"Authentication required|NOAUTH",
            lambda url: (
                "the server requires a password and REDIS_URL has none: use "
                "redis://:PASSWORD@host:port/db (or redis://USER:PASSWORD@... for an ACL user)"
            ),
        ),
        (
            r"DB index is out of range",
            lambda url: (
                f"the database number in REDIS_URL (/{_database(url)}) is not below the "
                "server's `databases` setting (16 by default: 0-15); use a lower one or raise it"
            ),
        ),
        (
            r"Redis [0-9.]+ is too old",
            lambda url: "upgrade the server to Redis 6.2 or newer",
        ),
        (
            r"No master found",
            lambda url: (
                "no Sentinel in REDIS_URL answered with a healthy primary by that name: "
                "check the Sentinel hosts and ports, the master name (the URL's path) and "
                "REDIS_SENTINEL_PASSWORD"
            ),
        ),
        (
            r"CERTIFICATE_VERIFY_FAILED|hostname mismatch|IP address mismatch",
            lambda url: (
                "the server's TLS certificate is not trusted: set REDIS_TLS_CA_FILE to "
                "the CA that signed it, and make sure it names the host written in REDIS_URL"
            ),
        ),
        (
            r"Name or service not known|nodename nor servname|Temporary failure in name "
            r"resolution|getaddrinfo failed",
            lambda url: (
                f"the host name {urlsplit(url).hostname!r} in REDIS_URL does not "
                "resolve: check its spelling and this machine's DNS"
            ),
        ),
        (
            r"Connection refused",
            lambda url: (
                f"nothing listens at {_address(url)}: is Redis running there, on that port, and "
                "bound to an address this machine can reach (bind / protected-mode)?"
            ),
        ),
        (
            r"Connection closed by server|Connection reset by peer",
            lambda url: (
                "the server hung up at once: if it speaks TLS use rediss://; otherwise "
                "check its maxclients and its log"
            ),
        ),
        (
            r"WRONG_VERSION_NUMBER|wrong version number|Timeout connecting|no answer within",
            lambda url: (
                (
                    "no TLS answer: is that port plain-text Redis? use redis://, or the server's "
                    "TLS port; else "
                    if urlsplit(url).scheme == "rediss"
                    else ""
                )
                + "nothing answered in time: a firewall dropping packets, a wrong host or port, or "
                "a paused or overloaded server (REDIS_STARTUP_TIMEOUT_SECONDS sets the deadline)"
            ),
        ),
    )
)


def startup_hint(error_text: str, redis_url: str) -> str:
    """The likely cause of `error_text` (a start-up failure against `redis_url`), as advice."""
    for pattern, hint in _RULES:
        if pattern.search(error_text):
            try:
                return f"{hint(redis_url)} (README: Troubleshooting)"
            except ValueError:  # a URL part the hint cannot read: the generic advice instead
                return GENERIC_HINT
    return GENERIC_HINT
