"""Upstream capacity: how many agent requests may hold an upstream connection at once, so one
application (or one client) at its limit never takes what another is entitled to.

Per replica, counted in plain integers (one event loop: no lock, no task, no timer per request):
- per application: `max_concurrent_requests` in `APPS_FILE`, by default an equal share of
  `UPSTREAM_POOL_SIZE` (`app.applications.concurrency_caps`). The caps add up to at most the
  pool (checked at start), so an application at its cap cannot make another one wait, and the
  connection pool itself never queues a request (its wait would otherwise count against the
  upstream's connect timeout and end in a 504 that blames a healthy upstream);
- per client address (`max_concurrent_per_client`, default 64; 0: none): the address
  `app.forwarding.client_ip` believes (`TRUSTED_PROXIES`), IPv6 by its /64 (one host's usual
  allocation). Cookieless requests start a new session each, so this is what bounds one
  anonymous client within its application;
- per session (`max_concurrent_per_session`, default 8; 0: none), counted once the session id
  is known (a new session has nothing open yet);
- the process: never more than `UPSTREAM_POOL_SIZE` in all (a guard; the caps already fit).

Over any of them the proxy answers 503 `upstream_busy` with `Retry-After` at once, before the
session is loaded for the application, client and pool limits (a refused request creates
nothing) and before the upstream is contacted for all of them.

Contract for the proxy: `enter` before anything reaches the upstream (raises `UpstreamBusy`),
`enter_session` once the session id is known, and exactly one `leave` with what was entered,
from a `finally` that runs after the upstream response was released or closed (so the
connector's count is down before the slot is free again): every exit path (normal end, errors,
browser disconnect, cancellation, shutdown) returns its slots.

`/metrics`: `agent_bff_upstream_slots_in_use{application}`, `..._slots_limit{application}`,
`agent_bff_upstream_pool_size`, `agent_bff_upstream_busy_total{application,limit}` (`limit`:
`application`, `client`, `session`, `pool`), read from these counters at scrape time.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from app.applications import AppConfig, concurrency_caps
from app.config import IPNetwork
from app.counts import decrement
from app.errors import ApiError
from app.forwarding import client_ip, peer_is_trusted
from app.metrics import ScrapeCollector

log = logging.getLogger(__name__)

# The limits, each with what a refused client is told when it is full.
_MESSAGES = {
    "application": "The agent service of this application has all the requests it may "
    "have open; retry shortly.",
    "client": "Too many agent requests are open from this address; retry when one has ended.",
    "session": "Too many agent requests are open in this session; retry when one has ended.",
    "pool": "All of the gateway's upstream connections are in use; retry shortly.",
}
LIMITS = tuple(_MESSAGES)
RETRY_AFTER_SECONDS = 1
# A flood is refused thousands of times a second: one log line per application and limit at
# most this often (the access log has every refusal).
_LOG_INTERVAL_SECONDS = 10.0
_PROXY_HINT_SECONDS = 60.0


class UpstreamBusy(ApiError):
    """503 `upstream_busy`: `limit` (one of `LIMITS`) is full."""

    def __init__(self, limit: str) -> None:
        super().__init__(
            503,
            "upstream_busy",
            _MESSAGES[limit],
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
        self.limit = limit


class AppSlots:
    """One application's caps and what is open now (`sessions`/`clients`: open requests per
    key, a key removed when its count is back to 0, so both stay as small as what is open)."""

    __slots__ = (
        "app_id",
        "clients",
        "in_use",
        "last_logged",
        "limit",
        "per_client",
        "per_session",
        "refused",
        "sessions",
    )

    def __init__(self, app: AppConfig, limit: int) -> None:
        self.app_id = app.app_id
        self.limit = limit
        self.per_session = app.max_concurrent_per_session
        self.per_client = app.max_concurrent_per_client
        self.in_use = 0
        self.sessions: dict[str, int] = {}
        self.clients: dict[str, int] = {}
        self.refused = dict.fromkeys(LIMITS, 0)
        self.last_logged = dict.fromkeys(LIMITS, -_LOG_INTERVAL_SECONDS)


class UpstreamCapacity:
    """The slots of every application, and of the process (`pool_size`)."""

    __slots__ = ("apps", "in_use", "pool_size")

    def __init__(self, apps: Mapping[str, AppConfig], pool_size: int) -> None:
        caps, problems = concurrency_caps(apps, pool_size)
        if problems:  # `Settings.from_env` refuses such a configuration at start
            raise ValueError("; ".join(problems))
        self.pool_size = pool_size
        self.in_use = 0
        self.apps = {app_id: AppSlots(app, caps[app_id]) for app_id, app in apps.items()}

    def enter(self, slots: AppSlots, client: str | None) -> None:
        """Take one slot of the application (and of `client`, when given); `UpstreamBusy`
        when a limit is full, nothing taken then."""
        if slots.in_use >= slots.limit:
            raise self._refuse(slots, "application")
        if self.in_use >= self.pool_size:
            raise self._refuse(slots, "pool")
        if client is not None:
            open_now = slots.clients.get(client, 0)
            if open_now >= slots.per_client:
                raise self._refuse(slots, "client")
            slots.clients[client] = open_now + 1
        slots.in_use += 1
        self.in_use += 1

    def enter_session(self, slots: AppSlots, session_id: str) -> None:
        """Count one more open request of `session_id` (after `enter`); `UpstreamBusy` when
        the session has `per_session` open already, nothing counted then."""
        open_now = slots.sessions.get(session_id, 0)
        if open_now >= slots.per_session:
            raise self._refuse(slots, "session")
        slots.sessions[session_id] = open_now + 1

    def leave(self, slots: AppSlots, client: str | None, session_id: str | None) -> None:
        """Return what `enter` (and `enter_session`, if `session_id`) took."""
        slots.in_use -= 1
        self.in_use -= 1
        if client is not None:
            decrement(slots.clients, client)
        if session_id is not None:
            decrement(slots.sessions, session_id)

    def _refuse(self, slots: AppSlots, limit: str) -> UpstreamBusy:
        slots.refused[limit] += 1
        now = time.monotonic()
        if now - slots.last_logged[limit] >= _LOG_INTERVAL_SECONDS:
            slots.last_logged[limit] = now
            log.warning(
                "upstream busy: the %s limit of app %s is full (%d of %d open in the app, %d "
                "in the process); answering 503 upstream_busy",
                limit,
                slots.app_id,
                slots.in_use,
                slots.limit,
                self.in_use,
            )
        return UpstreamBusy(limit)


def client_key(request: web.BaseRequest, trusted: Sequence[IPNetwork]) -> str:
    """The client address a per-client cap counts: `client_ip` (trusted-proxy aware), an IPv6
    address by its /64 (an IPv4-mapped one as the IPv4 address)."""
    ip = client_ip(request, trusted)
    if ":" not in ip:
        return ip
    try:
        address = ipaddress.IPv6Address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


_last_proxy_hint = -math.inf


def warn_if_clients_look_alike(request: web.BaseRequest, trusted: Sequence[IPNetwork]) -> None:
    """On a per-client refusal: when the request came with `X-Forwarded-For` from a peer not in
    `TRUSTED_PROXIES`, every client of that proxy shares one per-client cap; say so (a warning
    at most once per `_PROXY_HINT_SECONDS`)."""
    global _last_proxy_hint
    if "X-Forwarded-For" not in request.headers or peer_is_trusted(request, trusted):
        return
    now = time.monotonic()
    if now - _last_proxy_hint < _PROXY_HINT_SECONDS:
        return
    _last_proxy_hint = now
    log.warning(
        "per-client cap reached by %s, a peer that forwards X-Forwarded-For but is not in "
        "TRUSTED_PROXIES: all of its clients count as one address; add it to TRUSTED_PROXIES "
        "(or raise max_concurrent_per_client)",
        request.remote,
    )


class CapacityCollector(ScrapeCollector[UpstreamCapacity]):
    """The capacity counters as Prometheus series, read at scrape time."""

    def collect(self) -> Iterator[Metric]:
        capacity = self.source
        in_use = GaugeMetricFamily(
            "agent_bff_upstream_slots_in_use",
            "Agent requests holding an upstream slot now, by application.",
            labels=["application"],
        )
        limit = GaugeMetricFamily(
            "agent_bff_upstream_slots_limit",
            "Each application's cap on concurrent agent requests (max_concurrent_requests).",
            labels=["application"],
        )
        busy = CounterMetricFamily(
            "agent_bff_upstream_busy",
            "Agent requests refused with 503 upstream_busy, by application and full limit.",
            labels=["application", "limit"],
        )
        for app_id, slots in capacity.apps.items():
            in_use.add_metric([app_id], slots.in_use)
            limit.add_metric([app_id], slots.limit)
            for name in LIMITS:
                busy.add_metric([app_id, name], slots.refused[name])
        yield in_use
        yield limit
        yield GaugeMetricFamily(
            "agent_bff_upstream_pool_size",
            "Upstream connections this process may hold (UPSTREAM_POOL_SIZE).",
            value=capacity.pool_size,
        )
        yield busy
