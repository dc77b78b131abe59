"""The application registry: id -> upstream agent, credentials, allowed origins, limits.

`APPS_FILE` is TOML with one `[apps.<applicationId>]` table per frontend. Without it the
registry holds one application, `demo`, served by the built-in demo agent in the same process.
Every problem found while loading is collected, so one start reports all of them.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from app.proxy.header_policy import REQUESTS, RESPONSES, Direction, HeaderPolicy, header_policy

# A valid value of each header-list field, quoted when the field is not a list.
_HEADER_LIST_EXAMPLES = {
    "forward_request_headers": "['Anthropic-Beta', 'X-Stainless-*']",
    "relay_response_headers": "['OpenAI-*', 'X-Trace']",
}

APP_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Header names an application may not configure: the gateway owns or forbids them.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "cookie",
        "x-agent-thread-id",
        "x-application-id",
        "x-request-id",
    }
)
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

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

    @property
    def is_builtin_demo(self) -> bool:
        return self.upstream == BUILTIN_DEMO_UPSTREAM


def default_apps() -> dict[str, AppConfig]:
    """The registry used when no `APPS_FILE` is set: `demo` only, on the built-in agent, with
    resumable runs (the demo page resumes an answer after a reload or a dropped connection)."""
    return {
        DEMO_APP_ID: AppConfig(app_id=DEMO_APP_ID, upstream=BUILTIN_DEMO_UPSTREAM, resumable=True)
    }


def load_apps_file(path: str, environ: Mapping[str, str]) -> tuple[dict[str, AppConfig], list[str]]:
    """Read and validate `APPS_FILE`; returns (apps, problems). Problems name app and field."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as err:
        return {}, [f"APPS_FILE={path!r} cannot be read ({err.strerror}): fix the path or unset it"]
    except tomllib.TOMLDecodeError as err:
        return {}, [f"APPS_FILE={path!r} is not valid TOML ({err}): fix the file"]
    tables = raw.get("apps")
    if not isinstance(tables, dict) or not tables:
        return {}, [f"APPS_FILE={path!r} defines no [apps.<applicationId>] table: add one"]
    apps: dict[str, AppConfig] = {}
    problems: list[str] = []
    for app_id, table in tables.items():
        where = f"APPS_FILE {path!r} [apps.{app_id}]"
        if not APP_ID_RE.fullmatch(app_id):  # `$` would accept a trailing newline
            problems.append(f"{where}: application id must match {APP_ID_RE.pattern}: rename it")
            continue
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table")
            continue
        app, app_problems = _parse_app(app_id, table, environ, where)
        problems.extend(app_problems)
        if app is not None:
            apps[app_id] = app
    return apps, problems


def _parse_app(
    app_id: str, table: dict[str, Any], environ: Mapping[str, str], where: str
) -> tuple[AppConfig | None, list[str]]:
    problems: list[str] = []
    known = {
        "upstream",
        "headers",
        "allowed_origins",
        "forward_authorization",
        "forward_request_headers",
        "relay_response_headers",
        "connect_timeout_seconds",
        "idle_timeout_seconds",
        "max_body_bytes",
        "rate_limit_per_session",
        "rate_limit_per_app",
        *_CAPACITY_FIELDS,
        *_RESUMABLE_FIELDS,
    }
    for unknown in sorted(set(table) - known):
        problems.append(f"{where}: unknown field {unknown!r}: remove it (known: {sorted(known)})")

    upstream = table.get("upstream")
    if not isinstance(upstream, str) or not upstream:
        problems.append(f"{where}: field 'upstream' is required (an http:// or https:// base URL)")
        upstream = ""
    elif upstream != BUILTIN_DEMO_UPSTREAM:
        upstream = _expand(upstream, environ, f"{where} field 'upstream'", problems)
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(
                f"{where}: field 'upstream' must be an http:// or https:// URL with a host"
            )
        elif parts.query or parts.fragment or parts.username or parts.password:
            problems.append(
                f"{where}: field 'upstream' must not carry a query, fragment or credentials "
                "(put credentials in 'headers')"
            )
        upstream = upstream.rstrip("/")

    headers: dict[str, str] = {}
    raw_headers = table.get("headers", {})
    if not isinstance(raw_headers, dict):
        problems.append(f"{where}: field 'headers' must be a table of strings")
    else:
        for name, value in raw_headers.items():
            label = f"{where} field 'headers.{name}'"
            if not isinstance(value, str):
                problems.append(f"{label}: must be a string")
            elif not _HEADER_NAME_RE.match(name) or name.lower() in _RESERVED_HEADERS:
                problems.append(f"{label}: not a header name the gateway may send; remove it")
            else:
                expanded = _expand(value, environ, label, problems)
                if any(c in expanded for c in "\r\n\0"):
                    problems.append(f"{label}: value contains CR, LF or NUL")
                headers[name] = expanded

    origins = table.get("allowed_origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        problems.append(f"{where}: field 'allowed_origins' must be a list of origins")
        origins = []
    for origin in origins:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            problems.append(
                f"{where}: field 'allowed_origins' entry {origin!r} must look like "
                "'https://host[:port]' (no path)"
            )

    forward_auth = table.get("forward_authorization", False)
    if not isinstance(forward_auth, bool):
        problems.append(f"{where}: field 'forward_authorization' must be true or false")
        forward_auth = False

    forward = _header_policy(table, REQUESTS, where, problems)
    relay = _header_policy(table, RESPONSES, where, problems)
    connect_timeout = _positive_number(table, "connect_timeout_seconds", 5.0, where, problems)
    idle_timeout = _positive_number(table, "idle_timeout_seconds", 120.0, where, problems)
    max_body = table.get("max_body_bytes", 1_048_576)
    if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body <= 0:
        problems.append(f"{where}: field 'max_body_bytes' must be a positive integer")
        max_body = 1_048_576

    limits: dict[str, RateLimit | None] = {}
    for name in ("rate_limit_per_session", "rate_limit_per_app"):
        raw_limit = table.get(name)
        limits[name] = None
        if raw_limit is None:
            continue
        if not isinstance(raw_limit, str):
            problems.append(f"{where}: field {name!r} must be a string like '30/minute'")
            continue
        try:
            limits[name] = parse_rate_limit(raw_limit)
        except ValueError as err:
            problems.append(f"{where}: field {name!r} = {raw_limit!r} is not valid: {err}")

    capacity = _parse_capacity(table, where, problems)
    resumable = _parse_resumable(table, where, problems)

    if problems:
        return None, problems
    return (
        AppConfig(
            app_id=app_id,
            upstream=upstream,
            headers=headers,
            allowed_origins=frozenset(o.rstrip("/").lower() for o in origins),
            forward_authorization=forward_auth,
            forward=forward,
            relay=relay,
            connect_timeout_seconds=connect_timeout,
            idle_timeout_seconds=idle_timeout,
            max_body_bytes=max_body,
            rate_limit_per_session=limits["rate_limit_per_session"],
            rate_limit_per_app=limits["rate_limit_per_app"],
            **capacity,
            **resumable,
        ),
        [],
    )


# -- upstream capacity (app/capacity.py) ----------------------------------------------------

_CAPACITY_FIELDS = (
    "max_concurrent_requests",
    "max_concurrent_per_session",
    "max_concurrent_per_client",
    "upload_timeout_seconds",
)


def _parse_capacity(table: dict[str, Any], where: str, problems: list[str]) -> dict[str, Any]:
    """The capacity fields of one `[apps.<id>]` table (absent ones keep `AppConfig`'s
    defaults); a bad value is a problem naming the field and what to use."""
    fields: dict[str, Any] = {}
    for name, minimum in (
        ("max_concurrent_requests", 1),
        ("max_concurrent_per_session", 0),
        ("max_concurrent_per_client", 0),
    ):
        if name not in table:
            continue
        value = table[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            use = "a positive integer" if minimum else "0 (no cap) or a positive integer"
            problems.append(f"{where}: field {name!r} must be {use}")
        else:
            fields[name] = value
    if "upload_timeout_seconds" in table:
        fields["upload_timeout_seconds"] = _positive_number(
            table, "upload_timeout_seconds", 300.0, where, problems
        )
    return fields


# -- resumable runs (app/runs/) ---------------------------------------------------------

_RESUMABLE_FIELDS = (
    "resumable",
    "resume_window_seconds",
    "resume_max_events",
    "resume_max_bytes",
)


def _parse_resumable(table: dict[str, Any], where: str, problems: list[str]) -> dict[str, Any]:
    """The resumable-run fields of one `[apps.<id>]` table (absent ones keep the defaults)."""
    fields: dict[str, Any] = {}
    if "resumable" in table:
        if isinstance(table["resumable"], bool):
            fields["resumable"] = table["resumable"]
        else:
            problems.append(f"{where}: field 'resumable' must be true or false")
    if "resume_window_seconds" in table:
        fields["resume_window_seconds"] = _positive_number(
            table, "resume_window_seconds", 60.0, where, problems
        )
    for name in ("resume_max_events", "resume_max_bytes"):
        if name not in table:
            continue
        value = table[name]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            problems.append(f"{where}: field {name!r} must be a positive integer")
        else:
            fields[name] = value
    return fields


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


def _header_policy(
    table: Mapping[str, Any], direction: Direction, where: str, problems: list[str]
) -> HeaderPolicy:
    """The header policy an application's field `direction.setting` describes (a list of
    header names or prefixes added to the default set): `direction.default` when the field is
    absent or empty. Problems go to `problems`."""
    name, default = direction.setting, direction.default
    entries = table.get(name, [])
    if not isinstance(entries, list):
        example = _HEADER_LIST_EXAMPLES[name]
        problems.append(f"{where}: field {name!r} must be a list of header names, e.g. {example}")
        return default
    if not entries:
        return default
    policy, found = header_policy(direction, entries, where)
    problems.extend(found)
    return policy


def _positive_number(
    table: dict[str, Any], name: str, default: float, where: str, problems: list[str]
) -> float:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        problems.append(f"{where}: field {name!r} must be a positive number of seconds")
        return default
    return float(value)


def _expand(value: str, environ: Mapping[str, str], label: str, problems: list[str]) -> str:
    """Replace `${VAR}` with the environment's value; a missing variable is a problem."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            problems.append(f"{label}: environment variable ${{{name}}} is not set: set it")
            return ""
        return environ[name]

    return _ENV_REF_RE.sub(repl, value)


def resolve_apps(
    apps_file: str | None, environ: Mapping[str, str] = os.environ
) -> tuple[dict[str, AppConfig], list[str]]:
    """The registry for this process: the file's applications, or the built-in default."""
    if not apps_file:
        return default_apps(), []
    return load_apps_file(apps_file, environ)


def describe_apps(apps: Mapping[str, AppConfig]) -> str:
    """`demo -> builtin:demo, shop -> https://agents.internal:9000/v1` (the start-up log).
    Upstreams never carry credentials (`load_apps_file` refuses them), so they can be shown."""
    return ", ".join(f"{app_id} -> {apps[app_id].upstream}" for app_id in sorted(apps))
