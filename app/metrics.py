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
`RequestMetrics` the gateway middleware (app/middlewares.py, outermost) and its prepare hook feed;
`instrument_backend(app, store)` wraps the session backend the storage uses.

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
import time
from collections.abc import Iterator, Sequence

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

from app import fast_metrics, redis_internals
from app.fast_metrics import CounterChild, HistogramChild
from app.keys import APP_ID_KEY, METRICS_KEY
from app.sessions.backend import CasResult, SessionBackend, StoreUnavailable, TokenBucket
from app.sessions.pipelining import CommandPipeliner

NAMESPACE = "agent_bff"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"
# Client went away before the response (nginx's convention for "client closed request").
CLIENT_CLOSED = "499"
# Request latency: sub-millisecond memory-store hits up to minutes-long streams.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# Upstream time to first byte: an agent answers its headers in milliseconds to seconds (a model
# that thinks first); the connect timeout is the bound.
UPSTREAM_FIRST_BYTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Stream duration: a token stream lasts seconds to minutes; an idle subscription hours.
STREAM_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# The `application` label of a request without a configured application.
NO_APPLICATION = "-"
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


# Set while the gateway middleware is running this request; a streaming response prepared in
# that window is counted in `active_streams` until the middleware returns.
_HANDLING_KEY = web.RequestKey("metrics_handling", bool)
# `perf_counter()` when the request's stream started; 0.0 while it is not a stream.
_STREAM_KEY = web.RequestKey("metrics_stream", float)


def application_label(request: web.Request) -> str:
    """The request's configured application id, or `NO_APPLICATION`: bounded by `APPS_FILE`
    (the gateway middleware sets the id only for a configured application)."""
    # Indexed, not `request.get` (Python code around `__getitem__`): agent and session routes,
    # the busy ones, have an id.
    try:
        return request[APP_ID_KEY]
    except KeyError:
        return NO_APPLICATION


class RequestMetrics:
    """The per-request series, fed by the gateway middleware (app/middlewares.py), which is
    the outermost step: `begin` when a request arrives, `end` with its status when it leaves
    the middleware (streams: when they end), `count_stream` from the prepare hook."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # (application, route, method, status) -> the request counter's and the duration
        # histogram's series. The key space is bounded (configured applications x route
        # patterns x methods x statuses).
        self._cells: dict[tuple[str, str, str, str], tuple[CounterChild, HistogramChild]] = {}

    def begin(self, request: web.Request) -> None:
        request[_HANDLING_KEY] = True
        request[_STREAM_KEY] = 0.0  # set, not left missing: a missing key is a costly lookup
        self._metrics.in_flight_count += 1

    def end(self, request: web.Request, status: str, started: float) -> None:
        """Count the request (`status`: its status code, `CLIENT_CLOSED` when the client went
        away first, "500" for a failure) and its duration since `started` (`perf_counter`)."""
        metrics = self._metrics
        request[_HANDLING_KEY] = False
        metrics.in_flight_count -= 1
        try:  # `application_label`, inlined: this runs on every request
            application = request[APP_ID_KEY]
        except KeyError:
            application = NO_APPLICATION
        now = time.perf_counter()
        stream_started = request[_STREAM_KEY]
        if stream_started:
            metrics.active_streams.labels(application).dec()
            metrics.stream_duration.child((application,)).observe(now - stream_started)
        method = request.method
        if method not in METHODS:
            method = "other"
        key = (application, route_label(request), method, status)
        cells = self._cells.get(key)
        if cells is None:
            cells = self._cells[key] = (
                metrics.requests.child(key),
                metrics.request_duration.child(key[:3]),
            )
        cells[0].inc()
        cells[1].observe(now - started)

    def count_stream(self, request: web.Request, response: web.StreamResponse) -> None:
        """From `on_response_prepare`: a plain `web.Response` is prepared after the handler
        returned; only a response prepared while the handler still runs (SSE, WebSocket,
        chunked copies) is a stream."""
        if isinstance(response, web.Response):
            return
        if request.get(_HANDLING_KEY) and not request.get(_STREAM_KEY):
            request[_STREAM_KEY] = time.perf_counter()
            self._metrics.active_streams.labels(application_label(request)).inc()


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


def record_upstream_error(request: web.Request, kind: str) -> None:
    """Count one upstream failure of `kind` (e.g. `connect`, `timeout`, `status`, `truncated`)
    for the request's application."""
    metrics = request.app.get(METRICS_KEY)
    if metrics is not None:
        metrics.upstream_errors.labels(application_label(request), kind).inc()


def record_upstream_first_byte(request: web.Request, sent: float) -> None:
    """The upstream's response headers arrived for a request sent at `sent` (`perf_counter`)."""
    metrics = request.app.get(METRICS_KEY)
    if metrics is not None:
        histogram = metrics.upstream_first_byte.child((application_label(request),))
        histogram.observe(time.perf_counter() - sent)


def route_label(request: web.Request) -> str:
    """The route's pattern, bounded: never the raw path (ids, junk from scanners)."""
    resource = request.match_info.route.resource
    if resource is None:
        return UNMATCHED_ROUTE
    return resource.canonical


class InstrumentedBackend:
    """A `SessionBackend` that counts and times each operation of the one it wraps."""

    def __init__(self, backend: SessionBackend, metrics: Metrics) -> None:
        self.backend = backend
        self._metrics = metrics
        # (operation, ok) -> the operation counter's and the duration histogram's series
        # (created on first use: a series appears once it has something to count).
        self._cells: dict[tuple[str, bool], tuple[CounterChild, HistogramChild]] = {}

    def _done(self, operation: str, started: float, ok: bool) -> None:
        cells = self._cells.get((operation, ok))
        if cells is None:
            m = self._metrics
            cells = self._cells[operation, ok] = (
                m.store_operations.child((operation, "ok" if ok else "error")),
                m.store_duration.child((operation,)),
            )
        cells[0].inc()
        cells[1].observe(time.perf_counter() - started)

    def _failed(self, operation: str, err: StoreUnavailable) -> None:
        cause = err.__cause__
        error = type(cause).__name__ if cause is not None else "StoreUnavailable"
        self._metrics.store_errors.labels(operation, error).inc()

    @contextlib.contextmanager
    def _observe(self, operation: str) -> Iterator[None]:
        started = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        except StoreUnavailable as err:
            self._failed(operation, err)
            raise
        finally:
            self._done(operation, started, ok)

    async def get_and_touch(self, key: str, ttl: int) -> bytes | None:
        # Every request's read: `_observe` inlined (no generator context manager per call).
        started = time.perf_counter()
        ok = False
        try:
            value = await self.backend.get_and_touch(key, ttl)
            ok = True
            return value
        except StoreUnavailable as err:
            self._failed("get_and_touch", err)
            raise
        finally:
            self._done("get_and_touch", started, ok)

    async def create(self, key: str, value: bytes, ttl: int) -> bool:
        with self._observe("create"):
            return await self.backend.create(key, value, ttl)

    async def peek(self, key: str) -> tuple[bytes, float | None] | None:
        with self._observe("peek"):
            return await self.backend.peek(key)

    async def expire(self, key: str, ttl: int) -> None:
        with self._observe("expire"):
            await self.backend.expire(key, ttl)

    async def compare_and_set(self, key: str, expected: str, value: bytes, ttl: int) -> CasResult:
        # Every write: inlined like `get_and_touch`.
        started = time.perf_counter()
        ok = False
        try:
            result = await self.backend.compare_and_set(key, expected, value, ttl)
            ok = True
            return result
        except StoreUnavailable as err:
            self._failed("compare_and_set", err)
            raise
        finally:
            self._done("compare_and_set", started, ok)

    async def delete_if_revision(self, key: str, expected: str) -> CasResult:
        with self._observe("delete_if_revision"):
            return await self.backend.delete_if_revision(key, expected)

    async def delete_unless_revision(self, key: str, kept: str) -> CasResult:
        with self._observe("delete_unless_revision"):
            return await self.backend.delete_unless_revision(key, kept)

    async def replace(self, key: str, value: bytes, ttl: int) -> bytes | None:
        with self._observe("replace"):
            return await self.backend.replace(key, value, ttl)

    async def delete(self, key: str) -> None:
        with self._observe("delete"):
            await self.backend.delete(key)

    async def ping(self) -> None:
        with self._observe("ping"):
            await self.backend.ping()

    async def rate_limit(self, buckets: Sequence[TokenBucket]) -> float:
        with self._observe("rate_limit"):
            return await self.backend.rate_limit(buckets)

    async def close(self) -> None:
        await self.backend.close()


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


class _StoreCollector:
    """Scrape-time gauges of the store: Redis pool usage, or memory-store entries."""

    def __init__(self, backend: SessionBackend, *, cluster_counts: bool) -> None:
        self._backend = backend
        self._cluster_counts = cluster_counts

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        client = getattr(self._backend, "client", None)
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
            pipeliner = getattr(self._backend, "pipeliner", None)
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
        elif hasattr(self._backend, "__len__"):
            yield GaugeMetricFamily(
                f"{NAMESPACE}_memory_sessions",
                "Sessions held by the in-process memory store.",
                value=float(len(self._backend)),  # type: ignore[arg-type]
            )
            held = getattr(self._backend, "bytes", None)
            if isinstance(held, int):
                yield GaugeMetricFamily(
                    f"{NAMESPACE}_memory_session_bytes",
                    "Bytes the memory store counts against MEMORY_MAX_BYTES (keys, values and "
                    "a fixed overhead per entry).",
                    value=float(held),
                )
