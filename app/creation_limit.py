"""A limit on session *creation* per client address (`SESSION_CREATE_RATE`, default 60/minute).

A flood of cookieless writes (`PATCH /apps/{id}/session`, or first agent requests) creates one
session per request; without a limit one client fills the memory store (evicting everyone
else's sessions) or a Redis `maxmemory`. Here every new session takes one token from a bucket of
its client's address before anything is stored; over the limit the request is answered 429
`rate_limited` with `Retry-After`, and no session is created (reads never create one). Existing
sessions are never limited by this.

- The address is `app.forwarding.client_ip`: the peer, or behind `TRUSTED_PROXIES` the last
  untrusted hop of `X-Forwarded-For`. IPv6 clients are limited per /64 (one subscriber's
  usual allocation: an attacker cycling addresses in it gains nothing); IPv4-mapped IPv6 counts
  as its IPv4 address.
- Loopback clients are not limited: load tests, the local cluster and same-host tools. A
  proxy on the same host must therefore be in `TRUSTED_PROXIES` (it should be anyway), or
  every browser behind it looks like loopback and is not limited.
- Buckets are GCRA token buckets, checked by the session store's `rate_limit` operation (as
  the agent limits of `app.ratelimit`): `N/period` lets N creations through at once, then one
  every `period/N`. On Redis they are shared by every replica (key
  `{REDIS_AUX_PREFIX}rl:create:<address>`, one `EVALSHA` per creation); on the memory store
  they are per process.
- The buckets live in the session store, so when it is down, frozen, full or read-only the
  request is answered 503 at once (`StoreUnavailable` propagates: the session write would meet
  the same store, and waiting for it twice would double the time to that 503). A bucket the
  store refuses for its content (a foreign key of another type: `WRONGTYPE`) lets the creation
  through (fail open, logged at most every `FAIL_OPEN_LOG_SECONDS`), as for the agent limits.

Wiring: `creation_limit_ctx` (after the session store's context, whose store it uses) sets
`CREATION_GATE_KEY`, which `app.sessions.middleware.commit_session` awaits before a new session
is first saved: the one hook into session creation.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from redis.exceptions import ReadOnlyError, ResponseError

from app.applications import RateLimit
from app.config import Settings
from app.errors import ApiError
from app.forwarding import client_ip
from app.keys import CREATION_GATE_KEY, STORAGE_APP_KEY
from app.ratelimit import FAIL_OPEN_LOG_SECONDS, token_bucket
from app.sessions.backend import SessionBackend, StoreFull, StoreUnavailable
from app.sessions.middleware import SessionCreationGate

log = logging.getLogger(__name__)

# How often a refusal for a private address without TRUSTED_PROXIES is explained in the log.
_MISCONFIGURED_LOG_SECONDS = 60.0


@functools.lru_cache(maxsize=4096)
def client_bucket(address: str) -> str | None:
    """The part of the bucket key naming the client: the IPv4 address, the IPv6 /64 network,
    the raw text when it is no address (a Unix socket: limited as one client); None for a
    loopback client (not limited). Cached: parsing an address costs ~30k instructions."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address or "unknown"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _refused_for_content(err: StoreUnavailable) -> bool:
    """Whether the store answered but refused the bucket itself (an error reply such as
    WRONGTYPE), rather than being down, full (OOM) or read-only."""
    cause = err.__cause__
    return (
        isinstance(cause, ResponseError)
        and not isinstance(err, StoreFull)
        and not isinstance(cause, ReadOnlyError)
    )


def creation_key(aux_prefix: str, bucket: str) -> str:
    return f"{aux_prefix}rl:create:{bucket}"


class CreationGate:
    """`await gate(request)` before a new session is stored: 429 over the client's limit."""

    def __init__(self, settings: Settings, rate: RateLimit, store: SessionBackend) -> None:
        self._trusted = settings.trusted_proxies
        self._aux_prefix = settings.redis_aux_prefix
        self._rate = rate
        self._store = store
        self._last_fail_open_log = -math.inf
        self._last_hint_log = -math.inf

    async def __call__(self, request: web.Request) -> None:
        address = client_ip(request, self._trusted)
        bucket = client_bucket(address)
        if bucket is None:
            return
        try:
            wait = await self._store.rate_limit(
                [token_bucket(creation_key(self._aux_prefix, bucket), self._rate)]
            )
        except StoreUnavailable as err:
            if not _refused_for_content(err):
                raise
            now = time.monotonic()
            if now - self._last_fail_open_log >= FAIL_OPEN_LOG_SECONDS:
                self._last_fail_open_log = now
                log.warning("session creation limit not checked (store refused: %s); allowed", err)
            return
        if wait <= 0:
            return
        self._hint_if_misconfigured(address)
        raise ApiError(
            429,
            "rate_limited",
            "Too many new sessions from this address; retry after the time in Retry-After.",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    def _hint_if_misconfigured(self, address: str) -> None:
        """A private address over the limit without `TRUSTED_PROXIES` is likely the load
        balancer, with every browser behind it sharing one bucket: say so (rate-limited)."""
        if self._trusted:
            return
        try:
            private = ipaddress.ip_address(address.split("%", 1)[0]).is_private
        except ValueError:
            return
        now = time.monotonic()
        if private and now - self._last_hint_log >= _MISCONFIGURED_LOG_SECONDS:
            self._last_hint_log = now
            log.warning(
                "new sessions refused for the private address %s (SESSION_CREATE_RATE): if it is "
                "a load balancer or ingress, set TRUSTED_PROXIES so each browser is limited on "
                "its own address",
                address,
            )


def creation_limit_ctx(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """Cleanup context (after the session store's): the gate on the store the sessions use
    (metrics included), when `SESSION_CREATE_RATE` is not off."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        rate = settings.session_create_rate
        if rate is not None:
            store = app[STORAGE_APP_KEY].backend
            gate: SessionCreationGate = CreationGate(settings, rate, store)
            app[CREATION_GATE_KEY] = gate
        yield

    return ctx


__all__ = ["CreationGate", "client_bucket", "creation_key", "creation_limit_ctx"]
