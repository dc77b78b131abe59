"""Rate limits on agent requests, per session and per application, shared by all replicas.

Configured per application in `APPS_FILE` (`rate_limit_per_session = "30/minute"`,
`rate_limit_per_app = "600/minute"`; see `app.applications.parse_rate_limit`). Over a limit the
proxy answers 429 `rate_limited` with `Retry-After` before anything reaches the upstream and
before a session or conversation is created.

Algorithm: GCRA, i.e. a token bucket per limit. `N/period` lets a burst of up to N requests
through at once, then one every `period/N` on average; each bucket is one small key holding its
"theoretical arrival time", which expires as soon as the bucket is full again. Chosen over a
fixed window (no double burst at a window edge, exact `Retry-After`, one key per limit instead
of one per window). A request refused by either limit consumes neither, so a session hammering
its own limit does not use up its application's.

Stores:
- Redis (`SESSION_STORE=redis`): one `EVALSHA` per agent request checks and updates both
  buckets atomically, on Redis's clock (`TIME`), so every replica shares them. Keys:
  `{REDIS_AUX_PREFIX}rl:{<applicationId>}:app` and
  `{REDIS_AUX_PREFIX}rl:{<applicationId>}:s:<sha256(session id)[:32]>` (the session id itself
  never appears in a key name). The `{applicationId}` hash tag puts both keys of one call in
  one Redis Cluster slot.
- Memory: the same algorithm per process (N replicas allow N times the limit), bounded like
  the memory session store.

A failing limit store never turns an agent request into a 500 or 503: the request goes
through (fail open) and a warning is logged (at most once per `FAIL_OPEN_LOG_SECONDS`).
Limits protect the upstream from abuse; they are not worth an outage of their own. A full
Redis outage already answers 503 at the session load that precedes the check.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp_session import Session

from app.applications import RateLimit
from app.config import Settings
from app.errors import ApiError
from app.keys import APP_CONFIG_KEY, BACKEND_KEY, RATE_LIMITER_KEY, SETTINGS_KEY
from app.sessions.backend import StoreUnavailable
from app.sessions.redis import LuaScript, RedisBackend
from app.sessions.storage import SessionStorage

log = logging.getLogger(__name__)

FAIL_OPEN_LOG_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Bucket:
    """One limit to check: its store key and its rate."""

    key: str
    limit: RateLimit

    @property
    def interval_ms(self) -> float:
        return self.limit.period_seconds * 1000 / self.limit.count

    @property
    def period_ms(self) -> float:
        return self.limit.period_seconds * 1000.0


class RateLimiter(Protocol):
    async def acquire(self, buckets: Sequence[Bucket]) -> float:
        """Take one request from every bucket, or from none: 0 when allowed, else the
        seconds until it would be. Raises `StoreUnavailable`."""
        ...

    async def close(self) -> None: ...


def _gcra(
    tats: Sequence[float], buckets: Sequence[Bucket], now: float
) -> tuple[float, list[float]]:
    """(milliseconds to wait, new arrival times) for one request against every bucket."""
    wait = 0.0
    new_tats: list[float] = []
    for tat, bucket in zip(tats, buckets, strict=True):
        new_tat = max(tat, now) + bucket.interval_ms
        allow_at = new_tat - bucket.period_ms
        wait = max(wait, allow_at - now)
        new_tats.append(new_tat)
    return wait, new_tats


class MemoryRateLimiter:
    """Per-process buckets (key -> theoretical arrival time in ms), at most `max_entries`."""

    def __init__(
        self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._tats: OrderedDict[str, float] = OrderedDict()
        self._max_entries = max_entries
        self._clock = clock

    def __len__(self) -> int:
        return len(self._tats)

    async def acquire(self, buckets: Sequence[Bucket]) -> float:
        now = self._clock() * 1000
        wait, new_tats = _gcra([self._tats.get(b.key, 0.0) for b in buckets], buckets, now)
        if wait > 0:
            return wait / 1000
        for bucket, tat in zip(buckets, new_tats, strict=True):
            self._tats[bucket.key] = tat
            self._tats.move_to_end(bucket.key)
        # A bucket whose arrival time has passed is full again: dropping it changes nothing.
        while self._tats and (
            len(self._tats) > self._max_entries or next(iter(self._tats.values())) <= now
        ):
            self._tats.popitem(last=False)
        return 0.0

    async def close(self) -> None:
        self._tats.clear()


# KEYS: one per bucket (same hash slot). ARGV: interval_ms, period_ms per bucket.
# Answers 0 (allowed, every bucket updated) or the milliseconds to wait (nothing updated).
_GCRA_SCRIPT = LuaScript.of(
    """local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wait = 0
local tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - period
  if allow_at - now > wait then wait = allow_at - now end
  tats[i] = new_tat
end
if wait > 0 then return math.ceil(wait) end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.3f', tats[i]), 'PX', math.ceil(tats[i] - now))
end
return 0"""
)


class RedisRateLimiter:
    """Buckets in Redis, checked and updated by one script call per request."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend

    async def acquire(self, buckets: Sequence[Bucket]) -> float:
        args: list[Any] = []
        for bucket in buckets:
            args += [f"{bucket.interval_ms:.3f}", f"{bucket.period_ms:.3f}"]
        reply = await self._backend._run(
            lambda: _GCRA_SCRIPT.run(self._backend.execute, [b.key for b in buckets], args)
        )
        return int(reply) / 1000

    async def close(self) -> None:
        return None  # the client belongs to the session backend


def make_rate_limiter(settings: Settings, backend: object) -> RateLimiter:
    """Redis buckets when the sessions are in Redis (shared by replicas), else per process."""
    if isinstance(backend, RedisBackend):
        return RedisRateLimiter(backend)
    return MemoryRateLimiter(max_entries=settings.memory_max_sessions)


def rate_limit_ctx(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """Cleanup context (after the session store's): the limiter on the same store."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        limiter = make_rate_limiter(settings, app[BACKEND_KEY])
        app[RATE_LIMITER_KEY] = limiter
        yield
        await limiter.close()

    return ctx


def bucket_keys(aux_prefix: str, app_id: str, session_id: str | None) -> tuple[str, str | None]:
    """(application bucket key, session bucket key or None)."""
    base = f"{aux_prefix}rl:{{{app_id}}}:"
    if session_id is None:
        return base + "app", None
    digest = hashlib.sha256(session_id.encode("ascii")).hexdigest()[:32]
    return base + "app", f"{base}s:{digest}"


_last_fail_open_log = -math.inf


async def enforce_rate_limits(request: web.Request, session: Session) -> None:
    """429 `rate_limited` (with `Retry-After`) when the request's session or application is
    over its limit; counts the request otherwise. Call before contacting the upstream and
    before saving the session (a new session gets its id reserved here)."""
    global _last_fail_open_log
    app_config = request[APP_CONFIG_KEY]
    per_session, per_app = app_config.rate_limit_per_session, app_config.rate_limit_per_app
    if per_session is None and per_app is None:
        return
    limiter = request.app[RATE_LIMITER_KEY]
    # A browser's first agent request counts against its session too: the id the session will
    # be created under is reserved now (nothing is stored if the request is refused).
    session_id = SessionStorage.reserve_id(session) if per_session is not None else None
    app_key, session_key = bucket_keys(
        request.app[SETTINGS_KEY].redis_aux_prefix, app_config.app_id, session_id
    )
    buckets: list[Bucket] = []
    if per_session is not None and session_key is not None:
        buckets.append(Bucket(session_key, per_session))
    if per_app is not None:
        buckets.append(Bucket(app_key, per_app))
    if not buckets:
        return
    try:
        wait = await limiter.acquire(buckets)
    except StoreUnavailable as err:
        now = time.monotonic()
        if now - _last_fail_open_log >= FAIL_OPEN_LOG_SECONDS:
            _last_fail_open_log = now
            log.warning("rate limits not checked (store failed: %s); request allowed", err)
        return
    if wait > 0:
        raise ApiError(
            429,
            "rate_limited",
            "Too many agent requests; retry after the time in Retry-After.",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
