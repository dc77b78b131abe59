"""The application registry: id -> upstream agent, credentials, allowed origins, limits.

`APPS_FILE` is TOML with one `[apps.<applicationId>]` table per frontend (read by
app/apps_file.py). Without it the registry holds one application, `demo`, served by the
built-in demo agent in the same process.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from app.proxy.header_policy import REQUESTS, RESPONSES, HeaderPolicy

APP_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEMO_APP_ID = "demo"
# Marker upstream meaning "the built-in demo agent in this process".
BUILTIN_DEMO_UPSTREAM = "builtin:demo"


# Default concurrency caps per session and per client address (app/capacity.py).
DEFAULT_PER_SESSION = 8
DEFAULT_PER_CLIENT = 64


_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")
_PERIODS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
}


@dataclass(frozen=True, slots=True)
class RateLimit:
    """`count` requests per `period_seconds`: a token bucket that holds `count` tokens and
    refills at `count / period_seconds` per second (see app/ratelimit.py)."""

    count: int
    period_seconds: int

    def __str__(self) -> str:
        return f"{self.count}/{self.period_seconds}s"


def parse_rate_limit(text: str) -> RateLimit:
    """`"30/minute"`, `"600/min"`, `"5/10s"`, `"1000/hour"`, `"10/second"`, `"50000/day"`.

    Raises ValueError with a message saying what is wrong.
    """
    match = _RATE_RE.fullmatch(text.lower())
    if match is None or match.group(3) not in _PERIODS:
        raise ValueError("use '<count>/<period>', e.g. '30/minute', '600/hour' or '5/10s'")
    count = int(match.group(1))
    multiplier = int(match.group(2)) if match.group(2) else 1
    if count <= 0 or multiplier <= 0:
        raise ValueError("count and period must be positive")
    period = multiplier * _PERIODS[match.group(3)]
    if period > 7 * 86400:
        raise ValueError("the period may be at most a week")
    return RateLimit(count=count, period_seconds=period)


@dataclass(frozen=True, slots=True, kw_only=True)
class AppConfig:
    """One frontend application and its upstream agent service."""

    app_id: str
    upstream: str
    headers: Mapping[str, str] = field(default_factory=dict)
    allowed_origins: frozenset[str] = frozenset()
    forward_authorization: bool = False
    # The browser's request headers that reach the upstream (app/proxy/header_policy.py).
    forward: HeaderPolicy = REQUESTS.default
    # The upstream's response headers that reach the browser (app/proxy/header_policy.py).
    relay: HeaderPolicy = RESPONSES.default
    connect_timeout_seconds: float = 5.0
    idle_timeout_seconds: float = 120.0
    max_body_bytes: int = 1_048_576
    # Agent requests allowed per session and per application (None: unlimited); app/ratelimit.py.
    rate_limit_per_session: RateLimit | None = None
    rate_limit_per_app: RateLimit | None = None
    # Concurrent agent requests (app/capacity.py), per replica. The application's: None is its
    # share of UPSTREAM_POOL_SIZE (see `concurrency_caps`). Per session and per client
    # address: 0 is no cap. Uploads: the whole body within this long (None: the global
    # UPLOAD_TIMEOUT_SECONDS).
    max_concurrent_requests: int | None = None
    max_concurrent_per_session: int = DEFAULT_PER_SESSION
    max_concurrent_per_client: int = DEFAULT_PER_CLIENT
    upload_timeout_seconds: float | None = None
    # Resumable runs (app/runs/): event streams become runs a browser can resume on any
    # replica; kept `resume_window_seconds` after the last reader left (or the end), at most
    # `resume_max_events` events / `resume_max_bytes` bytes each (the oldest are dropped).
    resumable: bool = False
    resume_window_seconds: float = 60.0
    resume_max_events: int = 10_000
    resume_max_bytes: int = 4 * 1024 * 1024
    # Bytes of the application's ended runs kept in Redis (one to two windows) past which its new
    # runs are relayed without resume: one application never fills Redis for the others (F3).
    resume_redis_budget_bytes: int = 64 * 1024 * 1024
    # Runs one client address (IPv6 by /48) may start (None: no limit); past it its answers are
    # relayed without resume (app/runs/start.py).
    resume_runs_per_client: RateLimit | None = None

    @property
    def is_builtin_demo(self) -> bool:
        return self.upstream == BUILTIN_DEMO_UPSTREAM


def default_apps() -> dict[str, AppConfig]:
    """The registry used when no `APPS_FILE` is set: `demo` only, on the built-in agent, with
    resumable runs (the demo page resumes an answer after a reload or a dropped connection)."""
    return {
        DEMO_APP_ID: AppConfig(app_id=DEMO_APP_ID, upstream=BUILTIN_DEMO_UPSTREAM, resumable=True)
    }


def concurrency_caps(
    apps: Mapping[str, AppConfig], pool_size: int
) -> tuple[dict[str, int], list[str]]:
    """Each application's cap on concurrent upstream requests, and the problems that make the
    configuration unable to keep applications apart.

    An explicit `max_concurrent_requests` is used as is; the applications without one share
    what remains of `pool_size` equally (rounded down). The caps must add up to at most
    `pool_size` (`UPSTREAM_POOL_SIZE`): then no application can ever take a connection another
    one is entitled to, and the pool itself never makes a request wait.
    """
    explicit = {
        app_id: app.max_concurrent_requests
        for app_id, app in apps.items()
        if app.max_concurrent_requests is not None
    }
    shared = [app_id for app_id in apps if app_id not in explicit]
    remaining = pool_size - sum(explicit.values())
    caps = dict(explicit)
    problems: list[str] = []
    if remaining < 0 or (shared and remaining < len(shared)):
        needed = sum(explicit.values()) + len(shared)
        unset = f" plus one for each of the {len(shared)} without one" if shared else ""
        problems.append(
            f"UPSTREAM_POOL_SIZE={pool_size} is smaller than the applications' "
            f"max_concurrent_requests in APPS_FILE (together {sum(explicit.values())}{unset}): "
            f"raise UPSTREAM_POOL_SIZE to at least {needed} or lower the caps"
        )
        return {app_id: max(1, caps.get(app_id, 1)) for app_id in apps}, problems
    for app_id in shared:
        caps[app_id] = remaining // len(shared)
    return caps, problems


def describe_apps(apps: Mapping[str, AppConfig]) -> str:
    """`demo -> builtin:demo, shop -> https://agents.internal:9000/v1` (the start-up log).
    Upstreams never carry credentials (`load_apps_file` refuses them), so they can be shown."""
    return ", ".join(f"{app_id} -> {apps[app_id].upstream}" for app_id in sorted(apps))
