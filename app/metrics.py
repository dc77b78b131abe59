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
histograms, the store operation counter) are `FastCounter`/`FastHistogram`: plain numbers
without a lock, exported exactly as prometheus-client's `Counter`/`Histogram` would export
them; `http_requests_in_flight` is read from a plain count at scrape time.
"""

from __future__ import annotations

import bisect
import contextlib
import math
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
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

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
# Store latency: a healthy Redis answers in well under a millisecond on a LAN; the per-operation
# deadline is about two seconds.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)


def _created_series() -> bool:
    """Whether `_created` samples are exported (prometheus-client's switch:
    `PROMETHEUS_DISABLE_CREATED_SERIES`, `disable_created_metrics()`)."""
    return bool(getattr(prometheus_metrics, "_use_created", True))


class FastCounter:
    """A labelled counter kept as plain numbers, exported as prometheus-client's `Counter`
    exports it (`_total`, `_created`).

    `cell(labels)` is the series' `[value, created]` list: add to `cell[0]`. No lock and no
    child object per update (a `Counter` child takes a lock on every `inc`): only the event
    loop's thread updates it, and a scrape runs there too.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name = f"{NAMESPACE}_{name}"
        self.documentation = documentation
        self.labelnames = labelnames
        self._cells: dict[tuple[str, ...], list[float]] = {}

    def cell(self, labels: tuple[str, ...]) -> list[float]:
        cell = self._cells.get(labels)
        if cell is None:
            cell = self._cells[labels] = [0.0, time.time()]
        return cell

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, "counter")]

    def collect(self) -> list[Metric]:
        metric = Metric(self.name, self.documentation, "counter")
        created = _created_series()
        for labels, (value, since) in list(self._cells.items()):
            names = dict(zip(self.labelnames, labels, strict=True))
            metric.add_sample(self.name + "_total", names, value)
            if created:
                metric.add_sample(self.name + "_created", dict(names), since)
        return [metric]


class FastHistogram:
    """A labelled histogram kept as plain numbers, exported as prometheus-client's
    `Histogram` exports it (`_bucket`, `_count`, `_sum`, `_created`).

    `cell(labels)` is the series' list: one count per bucket (not cumulative), then the sum,
    then the creation time; `observe(cell, amount)` records one value. Same threading rule as
    `FastCounter`.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...],
    ) -> None:
        self.name = f"{NAMESPACE}_{name}"
        self.documentation = documentation
        self.labelnames = labelnames
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds) or not bounds or bounds[0] < 0:
            raise ValueError("buckets must be sorted and non-negative")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = bounds
        self._sum_index = len(bounds)
        # The `le` labels exactly as prometheus-client writes them.
        self._le: list[str] = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]
        self._cells: dict[tuple[str, ...], list[float]] = {}

    def cell(self, labels: tuple[str, ...]) -> list[float]:
        cell = self._cells.get(labels)
        if cell is None:
            cell = self._cells[labels] = [0.0] * self._sum_index + [0.0, time.time()]
        return cell

    def observe(self, cell: list[float], amount: float) -> None:
        # The first bucket whose upper bound is >= amount (the `le` semantics).
        cell[bisect.bisect_left(self._bounds, amount)] += 1.0
        cell[self._sum_index] += amount

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, "histogram")]

    def collect(self) -> list[Metric]:
        metric = Metric(self.name, self.documentation, "histogram")
        created = _created_series()
        n = self._sum_index
        for labels, cell in list(self._cells.items()):
            names = dict(zip(self.labelnames, labels, strict=True))
            total = 0.0
            for le, count in zip(self._le, cell[:n], strict=True):
                total += count
                metric.add_sample(self.name + "_bucket", {**names, "le": le}, total)
            metric.add_sample(self.name + "_count", dict(names), total)
            metric.add_sample(self.name + "_sum", dict(names), cell[n])
            if created:
                metric.add_sample(self.name + "_created", dict(names), cell[n + 1])
        return [metric]


class Metrics:
    """The application's metrics and the registry they live in."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The per-request series are plain numbers (`FastCounter`, `FastHistogram`): counted
        # on every request, scraped rarely.
        self.requests = FastCounter(
            "http_requests",
            "HTTP requests answered, by application, route pattern, method and status.",
            ("application", "route", "method", "status"),
        )
        r.register(self.requests)
        self.request_duration = FastHistogram(
            "http_request_duration_seconds",
            "Time from request to the end of the response (streams: until they end).",
            ("application", "route", "method"),
            HTTP_BUCKETS,
        )
        r.register(self.request_duration)
        # Requests being handled now: `in_flight_count`, read at scrape time.
        self.in_flight_count = 0
        self.in_flight = Gauge(
            "http_requests_in_flight",
            "Requests being handled now.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.in_flight.set_function(lambda: self.in_flight_count)
        self.store_operations = FastCounter(
            "session_store_operations",
            "Session store operations, by operation and result (ok or error).",
            ("operation", "result"),
        )
        r.register(self.store_operations)
        self.store_errors = Counter(
            "session_store_errors",
            "Session store operations that failed (store unavailable), by underlying error.",
            ["operation", "error"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.store_duration = FastHistogram(
            "session_store_operation_duration_seconds",
            "Session store operation latency, failures included.",
            ("operation",),
            STORE_BUCKETS,
        )
        r.register(self.store_duration)
        self.active_streams = Gauge(
            "active_streams",
            "Streaming responses (SSE, WebSocket) open now, by application.",
            ["application"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.stream_duration = FastHistogram(
            "stream_duration_seconds",
            "Streaming responses (SSE, WebSocket), from their first byte to their end.",
            ("application",),
            STREAM_BUCKETS,
        )
        r.register(self.stream_duration)
        self.upstream_errors = Counter(
            "upstream_errors",
            "Failures talking to agent upstreams, by application and kind.",
            ["application", "kind"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.upstream_first_byte = FastHistogram(
            "upstream_time_to_first_byte_seconds",
            "From sending a request to an agent upstream to its response headers.",
            ("application",),
            UPSTREAM_FIRST_BYTE_BUCKETS,
        )
        r.register(self.upstream_first_byte)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._store_collector: _StoreCollector | None = None

    def watch_store(self, backend: SessionBackend) -> None:
        """Export the pool usage (Redis) or the entry count (memory) of `backend`."""
        if self._store_collector is not None:
            self.registry.unregister(self._store_collector)
        self._store_collector = _StoreCollector(backend)
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
        # (application, route, method, status) -> the request counter's cell and the duration
        # histogram's cell. The key space is bounded (configured applications x route patterns
        # x methods x statuses).
        self._cells: dict[tuple[str, str, str, str], tuple[list[float], list[float]]] = {}

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
            stream_duration = metrics.stream_duration
            stream_duration.observe(stream_duration.cell((application,)), now - stream_started)
        method = request.method
        if method not in METHODS:
            method = "other"
        key = (application, route_label(request), method, status)
        cells = self._cells.get(key)
        if cells is None:
            cells = self._cells[key] = (
                metrics.requests.cell(key),
                metrics.request_duration.cell(key[:3]),
            )
        cells[0][0] += 1.0
        metrics.request_duration.observe(cells[1], now - started)

    def count_stream(self, request: web.Request, response: web.StreamResponse) -> None:
        """From `on_response_prepare`: a plain `web.Response` is prepared after the handler
        returned; only a response prepared while the handler still runs (SSE, WebSocket,
        chunked copies) is a stream."""
        if isinstance(response, web.Response):
            return
        if request.get(_HANDLING_KEY) and not request.get(_STREAM_KEY):
            request[_STREAM_KEY] = time.perf_counter()
            self._metrics.active_streams.labels(application_label(request)).inc()


def setup_metrics(app: web.Application) -> RequestMetrics:
    """Create the app's metrics and `GET /metrics`; the returned `RequestMetrics` goes to the
    gateway middleware (`app.middlewares.setup_gateway`), which counts every request."""
    metrics = Metrics()
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
        histogram = metrics.upstream_first_byte
        histogram.observe(histogram.cell((application_label(request),)), time.perf_counter() - sent)


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
        # (operation, ok) -> the operation counter's cell and the duration histogram's cell
        # (created on first use: a series appears once it has something to count).
        self._cells: dict[tuple[str, bool], tuple[list[float], list[float]]] = {}

    def _done(self, operation: str, started: float, ok: bool) -> None:
        cells = self._cells.get((operation, ok))
        if cells is None:
            m = self._metrics
            cells = self._cells[operation, ok] = (
                m.store_operations.cell((operation, "ok" if ok else "error")),
                m.store_duration.cell((operation,)),
            )
        cells[0][0] += 1.0
        self._metrics.store_duration.observe(cells[1], time.perf_counter() - started)

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
