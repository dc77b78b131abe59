"""Rate limits on agent requests, per session and per application, shared by all replicas.

Configured per application in `APPS_FILE` (`rate_limit_per_session = "30/minute"`,
`rate_limit_per_app = "600/minute"`; see `app.applications.parse_rate_limit`). Over a limit the
proxy answers 429 `rate_limited` with `Retry-After` before anything reaches the upstream and
before a session or conversation is created.

Algorithm: GCRA, i.e. a token bucket per limit, checked by the session store's `rate_limit`
operation (app/sessions/backend.py), with the same retries, deadline and metrics as every other
store operation. `N/period` lets a burst of up to N requests through at once, then one every
`period/N` on average; each bucket is one small key holding its "theoretical arrival time",
which expires as soon as the bucket is full again. Chosen over a fixed window (no double burst
at a window edge, exact `Retry-After`, one key per limit instead of one per window). A request
refused by either limit consumes neither, so a session hammering its own limit does not use up
its application's.

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

from aiohttp import web
from aiohttp_session import Session

from app.applications import RateLimit
from app.errors import ApiError
from app.keys import APP_CONFIG_KEY, SETTINGS_KEY, STORAGE_APP_KEY
from app.sessions.backend import StoreUnavailable, TokenBucket
from app.sessions.storage import SessionStorage

log = logging.getLogger(__name__)

FAIL_OPEN_LOG_SECONDS = 10.0


def token_bucket(key: str, limit: RateLimit) -> TokenBucket:
    """The store's bucket at `key` for a configured `limit`."""
    return TokenBucket(key, limit.count, limit.period_seconds)


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
    store = request.app[STORAGE_APP_KEY].backend
    # A browser's first agent request counts against its session too: the id the session will
    # be created under is reserved now (nothing is stored if the request is refused).
    session_id = SessionStorage.reserve_id(session) if per_session is not None else None
    app_key, session_key = bucket_keys(
        request.app[SETTINGS_KEY].redis_aux_prefix, app_config.app_id, session_id
    )
    buckets: list[TokenBucket] = []
    if per_session is not None and session_key is not None:
        buckets.append(token_bucket(session_key, per_session))
    if per_app is not None:
        buckets.append(token_bucket(app_key, per_app))
    if not buckets:
        return
    try:
        wait = await store.rate_limit(buckets)
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
