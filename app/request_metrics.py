"""The per-request series: every request counted with its route, method and final status and
timed (`RequestMetrics`, fed by the gateway middleware), streams counted while open, and the
upstream's failures and time to first byte (`record_upstream_error`,
`record_upstream_first_byte`, from the proxy). The series themselves are `app.metrics.Metrics`'."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web

from app.keys import APP_ID_KEY, METRICS_KEY

if TYPE_CHECKING:
    from app.fast_metrics import CounterChild, HistogramChild
    from app.metrics import Metrics

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"
# Client went away before the response (nginx's convention for "client closed request").
CLIENT_CLOSED = "499"
# The `application` label of a request without a configured application.
NO_APPLICATION = "-"

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
