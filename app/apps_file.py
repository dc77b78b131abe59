"""`APPS_FILE`: the TOML file of the application registry, read and validated into
`AppConfig`s (`load_apps_file`), or the built-in default without one (`resolve_apps`). Every
problem found is collected, each naming the application and the field, so one start reports
all of them."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from app.applications import (
    APP_ID_RE,
    BUILTIN_DEMO_UPSTREAM,
    AppConfig,
    RateLimit,
    default_apps,
    parse_rate_limit,
)
from app.proxy.header_policy import REQUESTS, RESPONSES, Direction, HeaderPolicy, header_policy

# A valid value of each header-list field, quoted when the field is not a list.
_HEADER_LIST_EXAMPLES = {
    "forward_request_headers": "['Anthropic-Beta', 'X-Stainless-*']",
    "relay_response_headers": "['OpenAI-*', 'X-Trace']",
}

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
    for name in ("rate_limit_per_session", "rate_limit_per_app", "resume_runs_per_client"):
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
            resume_runs_per_client=limits["resume_runs_per_client"],
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
    fields: dict[str, Any] = _integers(
        table,
        (
            ("max_concurrent_requests", 1),
            ("max_concurrent_per_session", 0),
            ("max_concurrent_per_client", 0),
        ),
        where,
        problems,
    )
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
    "resume_redis_budget_bytes",
    "resume_runs_per_client",
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
    fields.update(
        _integers(
            table,
            (("resume_max_events", 1), ("resume_max_bytes", 1), ("resume_redis_budget_bytes", 1)),
            where,
            problems,
        )
    )
    return fields


def _integers(
    table: dict[str, Any], names: tuple[tuple[str, int], ...], where: str, problems: list[str]
) -> dict[str, int]:
    """The whole-number fields `names` (each with its minimum, 1 or 0) present in `table`; a
    bad value is a problem naming the field (0 allowed: "0 (no cap)")."""
    fields: dict[str, int] = {}
    for name, minimum in names:
        if name not in table:
            continue
        value = table[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            use = "a positive integer" if minimum else "0 (no cap) or a positive integer"
            problems.append(f"{where}: field {name!r} must be {use}")
        else:
            fields[name] = value
    return fields


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
