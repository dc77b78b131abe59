"""Settings: read once at start from the environment plus an optional `.env` file.

`Settings.from_env` collects every problem into one `ConfigError`, so a bad deployment learns
all of its mistakes from one start. `python -m app` prints them one per line and exits 2
before binding a port. Passwords in `REDIS_URL` are never echoed back (`app.redis_env.redact_url`).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar

from dotenv import dotenv_values

from app.applications import (
    AppConfig,
    RateLimit,
    concurrency_caps,
    parse_rate_limit,
)
from app.apps_file import resolve_apps
from app.encryption_keys import parse_encryption_keys
from app.env_reader import EnvReader
from app.hosts import parse_allowed_hosts
from app.redis_env import check_redis_url, redis_tls_settings

StoreKind = Literal["memory", "redis"]
# 256 MiB: with the ~50 MB a replica needs itself, a memory-store replica fits a 512 MiB
# container under a flood of the largest sessions.
DEFAULT_MEMORY_MAX_BYTES = 256 * 1024 * 1024
# 60 new sessions per client address at once, then one a second: far above what browsers
# behind one NAT address create (one session per application and browser per idle TTL).
DEFAULT_SESSION_CREATE_RATE = RateLimit(count=60, period_seconds=60)
# MEMORY_MAX_BYTES must hold at least this many sessions of SESSION_MAX_BYTES.
MEMORY_MIN_SESSIONS_OF_MAX_SIZE = 64
SecureMode = Literal["auto", "true", "false"]
SameSite = Literal["Lax", "Strict", "None"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SECURE_MODES: dict[str, SecureMode] = {"auto": "auto", "true": "true", "false": "false"}
_SAMESITES: dict[str, SameSite] = {"Lax": "Lax", "Strict": "Strict", "None": "None"}
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


_Number = TypeVar("_Number", int, float)
# `Settings` field metadata: how `_parse` reads the field from the environment.
_READ = "read"


def positive(default: _Number) -> _Number:
    """Declares a `Settings` field read as a plain positive number: from the variable named as
    the field in upper case, a whole number when `default` is an int (else seconds, as a
    float); unset or empty gives `default`, a bad value is a problem (`ConfigError`)."""
    return field(default=default, metadata={_READ: "positive"})


class ConfigError(Exception):
    """Raised with every configuration problem found; each names the variable and the fix."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the process needs, validated. Build with `Settings.from_env`. A field
    declared `positive(default)` is read from its upper-cased name (`SESSION_TTL_SECONDS`);
    the others are read one by one in `_parse`."""

    host: str = "0.0.0.0"
    port: int = 8080
    # Connections the kernel completes and holds for the gateway to accept (listen(2)'s
    # backlog; the kernel caps it at net.core.somaxconn). aiohttp's 128 drops SYNs when a few
    # hundred clients connect at once (a reconnect wave after a deploy): they retry after 1 s,
    # 3 s ... and streams time out. 1024: several such waves, a few hundred KB of kernel memory.
    listen_backlog: int = 1024
    session_store: StoreKind = "memory"
    session_ttl_seconds: int = positive(3600)
    # Absolute lifetime from creation, however active the session (OWASP/ASVS 7.3.2). 0: off,
    # the default, because the spec keeps active sessions valid as long as they are used.
    session_absolute_seconds: int = 0
    # Fernet keys: the first encrypts, all decrypt (app/sessions/codec.py). Never in repr().
    session_encryption_keys: tuple[str, ...] = field(default=(), repr=False)
    # Kept out of repr(): it may carry the Redis password.
    redis_url: str | None = field(default=None, repr=False)
    redis_prefix: str = "agent:sess:"
    # Keys that are not sessions (rate-limit buckets): never under `redis_prefix`.
    redis_aux_prefix: str = "agent:aux:"
    apps_file: str | None = None
    apps: Mapping[str, AppConfig] = field(default_factory=dict)
    cookie_name: str = "agent_sid"
    cookie_secure: SecureMode = "auto"
    cookie_samesite: SameSite = "Lax"
    session_max_bytes: int = 65536
    # How long a rotated-away session id answers 409 `session_rotated` (its tombstone's TTL)
    # instead of "no session" (app/sessions/storage.py `rotate`).
    session_rotation_tombstone_seconds: int = 60
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # Host names served (app/hosts.py, DNS-rebinding defence); empty: any Host.
    allowed_hosts: tuple[str, ...] = ()
    shutdown_timeout_seconds: float = positive(30.0)
    # After SIGTERM, idle keep-alive connections stay open this long (app/lifecycle.py).
    shutdown_idle_grace_seconds: float = positive(5.0)
    # A client connection must deliver a whole request head within this long of opening (or
    # of its previous response); an idle keep-alive connection is closed after it too.
    # Bounds slowloris; keep it above the load balancer's upstream keep-alive (4 s in
    # deploy/nginx.conf) so the balancer, not the gateway, closes idle connections.
    header_timeout_seconds: float = positive(15.0)
    # A request body must arrive within this long: the whole body of a session-API request;
    # on agent uploads, the longest pause between body bytes (a slow but moving upload is
    # fine). Past it: 408 `body_timeout`, nothing changed or forwarded further.
    body_timeout_seconds: float = positive(30.0)
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"
    # Salt of the session hash in access lines; empty: random per process (app/logs.py).
    log_salt: str = field(default="", repr=False)
    # FAST_PATHS=auto: the fenced fast paths (app/fast_metrics.py, the access log's own
    # formatting in app/access_log.py, app/redis_internals.py, app/proxy/fastread.py) where
    # their start-up self-checks pass; off: the public API of prometheus-client, logging,
    # redis-py and aiohttp only.
    fast_paths: bool = True
    # Redis budget: a dead or frozen Redis must answer within about two seconds.
    redis_op_timeout_seconds: float = positive(2.0)
    redis_socket_timeout_seconds: float = positive(0.5)
    redis_connect_timeout_seconds: float = positive(0.5)
    redis_max_connections: int = positive(50)
    redis_pool_timeout_seconds: float = positive(1.0)
    redis_startup_timeout_seconds: float = positive(5.0)
    redis_health_check_seconds: int = positive(10)
    # TLS for rediss:// (verification on unless REDIS_TLS_VERIFY=false) and Sentinel AUTH.
    redis_tls_ca_file: str | None = None
    redis_tls_cert_file: str | None = None
    redis_tls_key_file: str | None = None
    redis_tls_verify: bool = True
    redis_sentinel_password: str | None = field(default=None, repr=False)
    # Memory store bounds.
    memory_max_sessions: int = positive(100_000)
    # Bytes of session data (plus a fixed per-entry overhead) the memory store holds at most;
    # the least recently used sessions are evicted beyond it (app/sessions/memory.py).
    memory_max_bytes: int = DEFAULT_MEMORY_MAX_BYTES
    # New sessions per client address (app/creation_limit.py); None: unlimited.
    session_create_rate: RateLimit | None = DEFAULT_SESSION_CREATE_RATE
    memory_sweep_interval_seconds: float = positive(60.0)
    # Agent proxy.
    sse_keepalive_seconds: float = positive(15.0)
    upstream_pool_size: int = positive(1000)
    demo_token_delay_seconds: float = positive(0.05)
    # Upstream capacity (app/capacity.py): an agent upload's whole body must arrive within
    # this long of the request (an application's `upload_timeout_seconds` wins); past it: 408
    # `body_timeout`, however steadily the bytes drip.
    upload_timeout_seconds: float = positive(300.0)
    # Resumable runs (app/runs/): the pump's heartbeat (stop checks, presence, liveness; a
    # dead pumper is noticed within 4 of them) and the connections blocking reads may hold.
    run_heartbeat_seconds: float = positive(0.5)
    run_follow_connections: int = positive(64)
    # Catch-up reads of run events (`XRANGE`) in flight per process: each is a reply Redis
    # buffers against `maxmemory` (app/runs/store.py).
    run_catchup_reads: int = positive(4)
    # How long a catch-up read waits for the gate (a read failing there fails the waiters).
    run_catchup_wait_seconds: float = positive(10.0)
    # How stale this replica's view of an application's run bytes in Redis may be, and how
    # long its ended runs' costs wait to be added there together (app/runs/budget.py).
    run_budget_refresh_seconds: float = positive(0.25)
    # Resume readers per replica (app/runs/readers.py): open resume streams of one run, and
    # runs one client address may have followed from Redis in one application.
    run_readers_per_run: int = positive(8)
    run_follows_per_client: int = positive(4)
    # Ended runs this process keeps readable (memory store; on Redis only those whose end
    # could not be recorded there): at most this many, and this many bytes of their events;
    # the oldest ended are forgotten first (app/runs/runs.py).
    run_ended_max_runs: int = positive(10_000)
    run_ended_max_bytes: int = positive(256 * 1024 * 1024)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, dotenv_path: str | None = ".env"
    ) -> Settings:
        """Merge `.env` (if present) under `environ` (which wins) and validate everything."""
        env: dict[str, str] = {}
        if dotenv_path and os.path.isfile(dotenv_path):
            env.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
        env.update(os.environ if environ is None else environ)
        return _parse(env)


def _positive_numbers(r: EnvReader) -> dict[str, Any]:
    """The `positive(...)` fields of `Settings`, by name, read from the environment (bad
    values recorded in `r.problems`). Each value has its field's type, int or float as its
    default (`Any`: mypy cannot tell the fields apart by key)."""
    numbers: dict[str, Any] = {}
    for f in fields(Settings):
        if f.metadata.get(_READ) != "positive":
            continue
        variable, default = f.name.upper(), f.default
        if isinstance(default, int):
            numbers[f.name] = r.positive_int(variable, default)
        else:
            assert isinstance(default, float)
            numbers[f.name] = r.positive_float(variable, default)
    return numbers


def _parse(env: Mapping[str, str]) -> Settings:
    r = EnvReader(env)
    store = r.choice("SESSION_STORE", "memory", ("memory", "redis"))
    redis_url = env.get("REDIS_URL", "").strip() or None
    if store == "redis":
        if redis_url is None:
            r.problems.append(
                "REDIS_URL is required when SESSION_STORE=redis: set it, e.g. "
                "REDIS_URL=redis://localhost:6379"
            )
        else:
            check_redis_url(redis_url, r.problems)
    tls = redis_tls_settings(env, r, redis_url if store == "redis" else None)
    prefix = env.get("REDIS_PREFIX", "agent:sess:")
    if not prefix or any(c.isspace() for c in prefix) or any(c in prefix for c in "*?[]"):
        r.problems.append(
            f"REDIS_PREFIX={prefix!r} is not valid: use a non-empty prefix without spaces or "
            "glob characters, e.g. agent:sess:"
        )
    aux_prefix = env.get("REDIS_AUX_PREFIX", "agent:aux:")
    if (
        not aux_prefix
        or any(c.isspace() for c in aux_prefix)
        or any(c in aux_prefix for c in "*?[]{}")
    ):
        r.problems.append(
            f"REDIS_AUX_PREFIX={aux_prefix!r} is not valid: use a non-empty prefix without "
            "spaces, braces or glob characters, e.g. agent:aux:"
        )
    elif prefix and (aux_prefix.startswith(prefix) or prefix.startswith(aux_prefix)):
        r.problems.append(
            f"REDIS_AUX_PREFIX={aux_prefix!r} and REDIS_PREFIX={prefix!r} overlap (one is a "
            "prefix of the other), so an application id could collide with a rate-limit key: "
            "use disjoint prefixes, e.g. agent:sess: and agent:aux:"
        )
    encryption_keys = parse_encryption_keys(env.get("SESSION_ENCRYPTION_KEYS", ""), r.problems)
    cookie_name = r.text("SESSION_COOKIE_NAME", "agent_sid")
    if not all(c.isalnum() or c in "_-." for c in cookie_name):
        r.problems.append(
            f"SESSION_COOKIE_NAME={cookie_name!r} is not valid: use letters, digits, _ - ."
        )
    secure = r.choice("SESSION_COOKIE_SECURE", "auto", ("auto", "true", "false"))
    samesite = r.choice("SESSION_COOKIE_SAMESITE", "Lax", ("Lax", "Strict", "None"))
    if samesite == "None" and secure == "false":
        r.problems.append(
            "SESSION_COOKIE_SAMESITE=None requires Secure cookies: set "
            "SESSION_COOKIE_SECURE=true (or auto behind HTTPS), or use Lax"
        )
    trusted = _parse_networks(env.get("TRUSTED_PROXIES", ""), r.problems)
    allowed_hosts = parse_allowed_hosts(env.get("ALLOWED_HOSTS", ""), r.problems)
    apps_file = env.get("APPS_FILE", "").strip() or None
    apps, app_problems = resolve_apps(apps_file, env)
    r.problems.extend(app_problems)
    port = r.positive_int("PORT", 8080, maximum=65535)
    listen_backlog = r.positive_int("LISTEN_BACKLOG", 1024, maximum=65535)
    session_max_bytes = r.positive_int("SESSION_MAX_BYTES", 65536)
    memory_max_bytes = r.positive_int("MEMORY_MAX_BYTES", DEFAULT_MEMORY_MAX_BYTES)
    if memory_max_bytes < MEMORY_MIN_SESSIONS_OF_MAX_SIZE * session_max_bytes:
        r.problems.append(
            f"MEMORY_MAX_BYTES={memory_max_bytes} is too small for SESSION_MAX_BYTES="
            f"{session_max_bytes}: use at least {MEMORY_MIN_SESSIONS_OF_MAX_SIZE} times it "
            f"({MEMORY_MIN_SESSIONS_OF_MAX_SIZE * session_max_bytes}), e.g. the default "
            f"{DEFAULT_MEMORY_MAX_BYTES}"
        )
    create_rate = _session_create_rate(env.get("SESSION_CREATE_RATE", ""), r.problems)
    settings = Settings(
        **_positive_numbers(r),
        host=r.text("HOST", "0.0.0.0"),
        port=port,
        listen_backlog=listen_backlog,
        session_store="redis" if store == "redis" else "memory",
        session_absolute_seconds=r.non_negative_int("SESSION_ABSOLUTE_SECONDS", 0),
        session_encryption_keys=encryption_keys,
        redis_url=redis_url,
        redis_prefix=prefix,
        redis_aux_prefix=aux_prefix,
        apps_file=apps_file,
        apps=apps,
        cookie_name=cookie_name,
        cookie_secure="true" if secure == "true" else "false" if secure == "false" else "auto",
        cookie_samesite="Strict"
        if samesite == "Strict"
        else "None"
        if samesite == "None"
        else "Lax",
        session_max_bytes=session_max_bytes,
        session_rotation_tombstone_seconds=r.positive_int(
            "SESSION_ROTATION_TOMBSTONE_SECONDS", 60, maximum=86400
        ),
        trusted_proxies=trusted,
        allowed_hosts=allowed_hosts,
        log_level=r.choice("LOG_LEVEL", "info", _LOG_LEVELS),
        log_format="json" if r.choice("LOG_FORMAT", "text", ("text", "json")) == "json" else "text",
        log_salt=env.get("LOG_SALT", ""),
        fast_paths=r.choice("FAST_PATHS", "auto", ("auto", "off")) == "auto",
        redis_tls_ca_file=tls.ca_file,
        redis_tls_cert_file=tls.cert_file,
        redis_tls_key_file=tls.key_file,
        redis_tls_verify=tls.verify,
        redis_sentinel_password=tls.sentinel_password,
        memory_max_bytes=memory_max_bytes,
        session_create_rate=create_rate,
    )
    # Upstream capacity: the applications' caps must fit in the pool (app/capacity.py).
    if not app_problems:
        r.problems.extend(concurrency_caps(settings.apps, settings.upstream_pool_size)[1])
    if r.problems:
        raise ConfigError(r.problems)
    return settings


def _session_create_rate(raw: str, problems: list[str]) -> RateLimit | None:
    """`SESSION_CREATE_RATE`: `N/period` (e.g. `60/minute`), `off` (or `0`) for no limit;
    empty: the default."""
    text = raw.strip().lower()
    if not text:
        return DEFAULT_SESSION_CREATE_RATE
    if text in ("off", "0"):
        return None
    try:
        return parse_rate_limit(text)
    except ValueError as err:
        problems.append(f"SESSION_CREATE_RATE={raw.strip()!r} is not valid: {err}, or 'off'")
        return DEFAULT_SESSION_CREATE_RATE


def _parse_networks(raw: str, problems: list[str]) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for item in raw.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            problems.append(
                f"TRUSTED_PROXIES entry {item!r} is not an IP or CIDR: use e.g. 10.0.0.0/8,::1"
            )
    return tuple(networks)
