"""Prometheus metrics: one `CollectorRegistry` per application, served at `GET /metrics`.

A registry per app (never prometheus-client's global one) keeps test apps, and several apps in
one process, from sharing or colliding on series. Label values are bounded: routes are the
router's canonical patterns (`/apps/{applicationId}/session`, never the raw path), methods
outside the standard set become `other`, and upstream errors are labelled by configured
application id and a small set of kinds.

Series (all prefixed `agent_bff_`):
- `http_requests_total{route,method,status}`, `http_request_duration_seconds{route,method}`
  (streams count until they end), `http_requests_in_flight`;
- `session_store_operations_total{operation,result}` (`result`: `ok` or `error`),
  `session_store_errors_total{operation,error}` (the underlying exception class),
  `session_store_operation_duration_seconds{operation}`;
- `redis_pool_connections{state}` (`in_use`, `idle`), `redis_pool_max_connections`;
  `memory_sessions` for the memory store;
- `active_streams` (streaming responses and WebSockets currently open);
- `upstream_errors_total{application,kind}` (`record_upstream_error`);
- the standard `process_*` and `python_info` series.

Wiring (`main.create_app`): `setup_metrics(app)` adds the middleware (outermost), the
`/metrics` route and the stream tracking; `instrument_backend(app, store)` wraps the session
backend the storage uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import GaugeMetricFamily, Metric

from app.sessions.backend import CasResult, SessionBackend, StoreUnavailable
from app.sessions.storage import APP_ID_KEY

NAMESPACE = "agent_bff"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"
# Client went away before the response (nginx's convention for "client closed request").
CLIENT_CLOSED = "499"
# Request latency: sub-millisecond memory-store hits up to minutes-long streams.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# Store latency: a healthy Redis answers in well under a millisecond on a LAN; the per-operation
# deadline is about two seconds.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)


class Metrics:
    """The application's metrics and the registry they live in."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "http_requests",
            "HTTP requests answered, by route pattern, method and status.",
            ["route", "method", "status"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.request_duration = Histogram(
            "http_request_duration_seconds",
            "Time from request to the end of the response (streams: until they end).",
            ["route", "method"],
            namespace=NAMESPACE,
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "http_requests_in_flight",
            "Requests being handled now.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.store_operations = Counter(
            "session_store_operations",
            "Session store operations, by operation and result (ok or error).",
            ["operation", "result"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.store_errors = Counter(
            "session_store_errors",
            "Session store operations that failed (store unavailable), by underlying error.",
            ["operation", "error"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.store_duration = Histogram(
            "session_store_operation_duration_seconds",
            "Session store operation latency, failures included.",
            ["operation"],
            namespace=NAMESPACE,
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge(
            "active_streams",
            "Streaming responses (SSE, WebSocket) open now.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.upstream_errors = Counter(
            "upstream_errors",
            "Failures talking to agent upstreams, by application and kind.",
            ["application", "kind"],
            namespace=NAMESPACE,
            registry=r,
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._store_collector: _StoreCollector | None = None

    def watch_store(self, backend: SessionBackend) -> None:
        """Export the pool usage (Redis) or the entry count (memory) of `backend`."""
        if self._store_collector is not None:
            self.registry.unregister(self._store_collector)
        self._store_collector = _StoreCollector(backend)
        self.registry.register(self._store_collector)


METRICS_KEY = web.AppKey("metrics", Metrics)
# Set while the metrics middleware is running this request; a streaming response prepared in
# that window is counted in `active_streams` until the middleware returns.
_HANDLING_KEY = web.RequestKey("metrics_handling", bool)
_STREAM_KEY = web.RequestKey("metrics_stream", bool)


def setup_metrics(app: web.Application) -> Metrics:
    """Create the app's metrics, add the outermost middleware and `GET /metrics`."""
    metrics = Metrics()
    app[METRICS_KEY] = metrics
    app.middlewares.insert(0, _metrics_middleware(metrics))
    app.on_response_prepare.append(_count_stream)
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry), allow_head=False)
    return metrics


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
        metrics.upstream_errors.labels(request.get(APP_ID_KEY, ""), kind).inc()


def route_label(request: web.Request) -> str:
    """The route's pattern, bounded: never the raw path (ids, junk from scanners)."""
    resource = request.match_info.route.resource
    if resource is None:
        return UNMATCHED_ROUTE
    return resource.canonical


def _metrics_middleware(metrics: Metrics) -> Middleware:
    # (route, method, status) -> the label children of the request counter and the duration
    # histogram: `labels()` takes a lock and builds a tuple key on every call. The key space is
    # bounded (route patterns x methods x statuses).
    children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
    in_flight = metrics.in_flight
    active_streams = metrics.active_streams
    perf_counter = time.perf_counter

    @web.middleware
    async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = perf_counter()
        method = request.method if request.method in METHODS else "other"
        status = "500"
        request[_HANDLING_KEY] = True
        in_flight.inc()
        try:
            response = await handler(request)
            status = str(response.status)
            return response
        except web.HTTPException as exc:
            status = str(exc.status)
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            request[_HANDLING_KEY] = False
            in_flight.dec()
            if request.get(_STREAM_KEY):
                active_streams.dec()
            route = route_label(request)
            key = (route, method, status)
            pair = children.get(key)
            if pair is None:
                pair = (
                    metrics.requests.labels(route, method, status),
                    metrics.request_duration.labels(route, method),
                )
                children[key] = pair
            pair[0].inc()
            pair[1].observe(perf_counter() - started)

    return metrics_middleware


async def _count_stream(request: web.Request, response: web.StreamResponse) -> None:
    # A plain `web.Response` is prepared after the handler returned; only a response prepared
    # while the handler still runs (SSE, WebSocket, chunked copies) is a stream.
    streaming = request.get(_HANDLING_KEY) and not isinstance(response, web.Response)
    if streaming and not request.get(_STREAM_KEY):
        request[_STREAM_KEY] = True
        request.app[METRICS_KEY].active_streams.inc()


class InstrumentedBackend:
    """A `SessionBackend` that counts and times each operation of the one it wraps."""

    def __init__(self, backend: SessionBackend, metrics: Metrics) -> None:
        self.backend = backend
        self._metrics = metrics
        self._op_children: dict[tuple[str, str], Any] = {}
        self._duration_children: dict[str, Any] = {}

    @contextlib.contextmanager
    def _observe(self, operation: str) -> Iterator[None]:
        started = time.perf_counter()
        result = "error"
        try:
            yield
            result = "ok"
        except StoreUnavailable as err:
            cause = err.__cause__
            error = type(cause).__name__ if cause is not None else "StoreUnavailable"
            self._metrics.store_errors.labels(operation, error).inc()
            raise
        finally:
            self._children(operation, result).inc()
            self._durations(operation).observe(time.perf_counter() - started)

    def _children(self, operation: str, result: str) -> Any:
        # Cached label children: `labels()` locks and builds a key on every call.
        child = self._op_children.get((operation, result))
        if child is None:
            child = self._metrics.store_operations.labels(operation, result)
            self._op_children[(operation, result)] = child
        return child

    def _durations(self, operation: str) -> Any:
        child = self._duration_children.get(operation)
        if child is None:
            child = self._metrics.store_duration.labels(operation)
            self._duration_children[operation] = child
        return child

    async def get_and_touch(self, key: str, ttl: int) -> bytes | None:
        # Every request's read: `_observe` inlined (no generator context manager per call).
        started = time.perf_counter()
        result = "error"
        try:
            value = await self.backend.get_and_touch(key, ttl)
            result = "ok"
            return value
        except StoreUnavailable as err:
            cause = err.__cause__
            error = type(cause).__name__ if cause is not None else "StoreUnavailable"
            self._metrics.store_errors.labels("get_and_touch", error).inc()
            raise
        finally:
            self._children("get_and_touch", result).inc()
            self._durations("get_and_touch").observe(time.perf_counter() - started)

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
        with self._observe("compare_and_set"):
            return await self.backend.compare_and_set(key, expected, value, ttl)

    async def delete_if_revision(self, key: str, expected: str) -> CasResult:
        with self._observe("delete_if_revision"):
            return await self.backend.delete_if_revision(key, expected)

    async def delete(self, key: str) -> None:
        with self._observe("delete"):
            await self.backend.delete(key)

    async def ping(self) -> None:
        with self._observe("ping"):
            await self.backend.ping()

    async def close(self) -> None:
        await self.backend.close()


def _pool_usage(client: object) -> tuple[float, float, float]:
    """(in use, idle, bound) of a redis-py asyncio client's connections.

    redis-py keeps these as plain attributes (4.x through 8.x): one pool for a standalone or
    Sentinel client, one connection list per node for a cluster. Read defensively, so a
    future rename costs a series, not a scrape.
    """
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        in_use = len(getattr(pool, "_in_use_connections", ()))
        idle = len(getattr(pool, "_available_connections", ()))
        return in_use, idle, float(getattr(pool, "max_connections", 0) or 0)
    total_in_use = total_idle = total_bound = 0.0
    get_nodes = getattr(client, "get_nodes", None)
    for node in get_nodes() if callable(get_nodes) else ():
        idle = len(getattr(node, "_free", ()))
        total_idle += idle
        total_in_use += max(len(getattr(node, "_connections", ())) - idle, 0)
        total_bound += float(getattr(node, "max_connections", 0) or 0)
    return total_in_use, total_idle, total_bound


class _StoreCollector:
    """Scrape-time gauges of the store: Redis pool usage, or memory-store entries."""

    def __init__(self, backend: SessionBackend) -> None:
        self._backend = backend

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        client = getattr(self._backend, "client", None)
        if client is not None:
            in_use, idle, bound = _pool_usage(client)
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
        elif hasattr(self._backend, "__len__"):
            yield GaugeMetricFamily(
                f"{NAMESPACE}_memory_sessions",
                "Sessions held by the in-process memory store.",
                value=float(len(self._backend)),  # type: ignore[arg-type]
            )
