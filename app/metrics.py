"""Prometheus metrics: one `CollectorRegistry` per application, served at `GET /metrics`.

A registry per app (never prometheus-client's global one) keeps test apps, and several apps in
one process, from sharing or colliding on series. Label values are bounded: routes are the
router's canonical patterns (`/apps/{applicationId}/session`, never the raw path), methods
outside the standard set become `other`, `application` is a configured application id or
`NO_APPLICATION` (`-`: routes without one, and unknown or malformed ids, which the gateway
refuses before it sets one), and upstream errors are labelled by a small set of kinds.

Series (all prefixed `agent_bff_`):
- `http_requests_total{application,route,method,status}`,
  `http_request_duration_seconds{application,route,method}` (streams count until they end),
  `http_requests_in_flight`;
- `session_store_operations_total{operation,result}` (`result`: `ok` or `error`),
  `session_store_errors_total{operation,error}` (the underlying exception class),
  `session_store_operation_duration_seconds{operation}`;
- `redis_pool_connections{state}` (`in_use`, `idle`), `redis_pool_max_connections`;
  `redis_pipelined_batches_total`, `redis_pipelined_commands_total` (automatic pipelining);
  `memory_sessions` and `memory_session_bytes` (against `MEMORY_MAX_BYTES`) for the memory
  store;
- `active_streams{application}` (streaming responses and WebSockets currently open) and
  `stream_duration_seconds{application}` (from the first byte of a stream to its end);
- `upstream_errors_total{application,kind}` (`record_upstream_error`) and
  `upstream_time_to_first_byte_seconds{application}` (`record_upstream_first_byte`: from
  sending the request to the upstream's response headers, a streamed upload included);
- the standard `process_*` and `python_info` series.

Wiring (`main.create_app`): `setup_metrics(app)` adds the `/metrics` route and returns the
`RequestMetrics` (app/request_metrics.py) the gateway middleware (app/middlewares.py,
outermost) and its prepare hook feed; `instrument_backend(app, store)` wraps the session
backend the storage uses (`InstrumentedBackend`, app/store_metrics.py).

Cost: the series updated on every request (`http_requests_total`, the request and store
histograms, the store operation counter) come from app/fast_metrics.py, the fenced fast path:
plain numbers without a lock, exported exactly as prometheus-client's `Counter`/`Histogram`
(checked at start-up), or those classes themselves (`FAST_PATHS=off`, or a failed check);
`http_requests_in_flight` is read from a plain count at scrape time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Generic, TypeVar

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app import fast_metrics, redis_internals
from app.keys import METRICS_KEY
from app.request_metrics import RequestMetrics
from app.sessions.backend import SessionBackend
from app.sessions.pipelining import CommandPipeliner
from app.store_metrics import InstrumentedBackend

_SourceT = TypeVar("_SourceT")

NAMESPACE = "agent_bff"
# Request latency: sub-millisecond memory-store hits up to minutes-long streams.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# Upstream time to first byte: an agent answers its headers in milliseconds to seconds (a model
# that thinks first); the connect timeout is the bound.
UPSTREAM_FIRST_BYTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Stream duration: a token stream lasts seconds to minutes; an idle subscription hours.
STREAM_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# The attribute of redis-py's `ConnectionPool.get_connection_count()` that says which state a
# count is of (OpenTelemetry's semantic-convention name).
CONNECTION_STATE = "db.client.connection.state"
# Store latency: a healthy Redis answers in well under a millisecond on a LAN; the per-operation
# deadline is about two seconds.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)


_log = logging.getLogger(__name__)


@functools.cache
def fast_series_problem() -> str | None:
    """`fast_metrics.self_check()`, once per process: None when the fast series may be used."""
    problem = fast_metrics.self_check()
    if problem is not None:
        _log.warning(
            "metrics: prometheus-client's own series instead of the fast ones: %s", problem
        )
    return problem


class Metrics:
    """The application's metrics and the registry they live in.

    `fast`: the per-request series are app/fast_metrics.py's plain numbers (when its start-up
    self-check passes), else prometheus-client's `Counter`/`Histogram` (`FAST_PATHS=off`)."""

    def __init__(self, *, fast: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Per-state connection counts of a Redis cluster (app/redis_internals.py, fenced).
        self.cluster_counts = fast and redis_internals.usable()
        self.fast = fast = fast and fast_series_problem() is None
        self.requests = fast_metrics.counter(
            f"{NAMESPACE}_http_requests",
            "HTTP requests answered, by application, route pattern, method and status.",
            ("application", "route", "method", "status"),
            r,
            fast=fast,
        )
        self.request_duration = fast_metrics.histogram(
            f"{NAMESPACE}_http_request_duration_seconds",
            "Time from request to the end of the response (streams: until they end).",
            ("application", "route", "method"),
            HTTP_BUCKETS,
            r,
            fast=fast,
        )
        # Requests being handled now: `in_flight_count`, read at scrape time.
        self.in_flight_count = 0
        self.in_flight = Gauge(
            "http_requests_in_flight",
            "Requests being handled now.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.in_flight.set_function(lambda: self.in_flight_count)
        self.store_operations = fast_metrics.counter(
            f"{NAMESPACE}_session_store_operations",
            "Session store operations, by operation and result (ok or error).",
            ("operation", "result"),
            r,
            fast=fast,
        )
        self.store_errors = Counter(
            "session_store_errors",
            "Session store operations that failed (store unavailable), by underlying error.",
            ["operation", "error"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.store_duration = fast_metrics.histogram(
            f"{NAMESPACE}_session_store_operation_duration_seconds",
            "Session store operation latency, failures included.",
            ("operation",),
            STORE_BUCKETS,
            r,
            fast=fast,
        )
        self.active_streams = Gauge(
            "active_streams",
            "Streaming responses (SSE, WebSocket) open now, by application.",
            ["application"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.stream_duration = fast_metrics.histogram(
            f"{NAMESPACE}_stream_duration_seconds",
            "Streaming responses (SSE, WebSocket), from their first byte to their end.",
            ("application",),
            STREAM_BUCKETS,
            r,
            fast=fast,
        )
        self.upstream_errors = Counter(
            "upstream_errors",
            "Failures talking to agent upstreams, by application and kind.",
            ["application", "kind"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.upstream_first_byte = fast_metrics.histogram(
            f"{NAMESPACE}_upstream_time_to_first_byte_seconds",
            "From sending a request to an agent upstream to its response headers.",
            ("application",),
            UPSTREAM_FIRST_BYTE_BUCKETS,
            r,
            fast=fast,
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._store_collector: _StoreCollector | None = None

    def watch_store(self, backend: SessionBackend) -> None:
        """Export the pool usage (Redis) or the entry count (memory) of `backend`."""
        if self._store_collector is not None:
            self.registry.unregister(self._store_collector)
        self._store_collector = _StoreCollector(backend, cluster_counts=self.cluster_counts)
        self.registry.register(self._store_collector)


class ScrapeCollector(Generic[_SourceT]):
    """Series read from `source` at scrape time: subclasses yield them from `collect`;
    `describe` yields the same series, so that the registry learns their names."""

    def __init__(self, source: _SourceT) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


@contextlib.contextmanager
def exported(app: web.Application, collector: Collector) -> Iterator[None]:
    """Export `collector` on `app`'s `/metrics` while the block runs (nothing when the app has
    no metrics): registered on entry, unregistered on the way out, however the block ends."""
    metrics = app.get(METRICS_KEY)
    if metrics is not None:
        metrics.registry.register(collector)
    try:
        yield
    finally:
        if metrics is not None:
            metrics.registry.unregister(collector)


def setup_metrics(app: web.Application, *, fast: bool = True) -> RequestMetrics:
    """Create the app's metrics and `GET /metrics`; the returned `RequestMetrics` goes to the
    gateway middleware (`app.middlewares.setup_gateway`), which counts every request. `fast`:
    the fenced fast paths (app/fast_metrics.py, app/redis_internals.py) where their start-up
    self-checks pass; False (`FAST_PATHS=off`): prometheus-client's and redis-py's public API."""
    metrics = Metrics(fast=fast)
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry), allow_head=False)
    return RequestMetrics(metrics)


def instrument_backend(app: web.Application, backend: SessionBackend) -> SessionBackend:
    """`backend` wrapped so every operation is counted and timed (no-op without metrics)."""
    metrics = app.get(METRICS_KEY)
    if metrics is None:
        return backend
    metrics.watch_store(backend)
    return InstrumentedBackend(backend, metrics)


def _pool_usage(
    client: object, *, cluster_counts: bool
) -> tuple[float | None, float | None, float]:
    """(in use, idle, bound) of a redis-py asyncio client's connections; the counts are None
    when unknown.

    A standalone or Sentinel client has one pool, counted through redis-py's public
    `get_connection_count()` ([(count, {CONNECTION_STATE: "idle" or "used", ...}), ...]).
    A cluster has one connection list per node, with no public count: app/redis_internals.py
    reads them when `cluster_counts` (its start-up self-check passed, `FAST_PATHS` not off).
    """
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        counts = {"idle": 0.0, "used": 0.0}
        for count, attributes in pool.get_connection_count():
            state = attributes.get(CONNECTION_STATE)
            if state in counts:
                counts[state] += count
        return counts["used"], counts["idle"], float(getattr(pool, "max_connections", 0) or 0)
    total_in_use = total_idle = total_bound = 0.0
    known = cluster_counts
    get_nodes = getattr(client, "get_nodes", None)
    for node in get_nodes() if callable(get_nodes) else ():
        usage = redis_internals.node_connections(node) if cluster_counts else None
        if usage is None:
            known = False
        else:
            total_in_use += usage[0]
            total_idle += usage[1]
        total_bound += float(getattr(node, "max_connections", 0) or 0)
    if not known:
        return None, None, total_bound
    return total_in_use, total_idle, total_bound


class _StoreCollector(ScrapeCollector[SessionBackend]):
    """Scrape-time gauges of the store: Redis pool usage, or memory-store entries."""

    def __init__(self, backend: SessionBackend, *, cluster_counts: bool) -> None:
        super().__init__(backend)
        self._cluster_counts = cluster_counts

    def collect(self) -> Iterator[Metric]:
        client = getattr(self.source, "client", None)
        if client is not None:
            in_use, idle, bound = _pool_usage(client, cluster_counts=self._cluster_counts)
            if in_use is not None and idle is not None:
                connections = GaugeMetricFamily(
                    f"{NAMESPACE}_redis_pool_connections",
                    "Redis connections held by this process, by state (all cluster nodes summed).",
                    labels=["state"],
                )
                connections.add_metric(["in_use"], in_use)
                connections.add_metric(["idle"], idle)
                yield connections
            yield GaugeMetricFamily(
                f"{NAMESPACE}_redis_pool_max_connections",
                "The pool's bound (REDIS_MAX_CONNECTIONS; per node for a cluster, summed).",
                value=bound,
            )
            pipeliner = getattr(self.source, "pipeliner", None)
            if isinstance(pipeliner, CommandPipeliner):
                yield CounterMetricFamily(
                    f"{NAMESPACE}_redis_pipelined_batches",
                    "Pipelined writes sent to Redis (commands of one event-loop iteration).",
                    value=pipeliner.batches,
                )
                yield CounterMetricFamily(
                    f"{NAMESPACE}_redis_pipelined_commands",
                    "Commands sent in those batches (divided by the batches: the mean batch).",
                    value=pipeliner.commands,
                )
        elif hasattr(self.source, "__len__"):
            yield GaugeMetricFamily(
                f"{NAMESPACE}_memory_sessions",
                "Sessions held by the in-process memory store.",
                value=float(len(self.source)),  # type: ignore[arg-type]
            )
            held = getattr(self.source, "bytes", None)
            if isinstance(held, int):
                yield GaugeMetricFamily(
                    f"{NAMESPACE}_memory_session_bytes",
                    "Bytes the memory store counts against MEMORY_MAX_BYTES (keys, values and "
                    "a fixed overhead per entry).",
                    value=float(held),
                )
