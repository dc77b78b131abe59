"""The per-request series' fast path (app/fast_metrics.py) exports exactly what
prometheus-client's own `Counter`/`Histogram` would, is checked at start-up, and gives way to
prometheus-client's classes when the check fails or `FAST_PATHS=off`."""

from __future__ import annotations

import bisect
import random

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter

from app import fast_metrics, metrics
from app.fast_metrics import FastCounter, FastHistogram, exposition
from app.metrics import HTTP_BUCKETS, NAMESPACE, Metrics


def _pair(
    fast: bool,
) -> tuple[CollectorRegistry, fast_metrics.CounterFamily, fast_metrics.HistogramFamily]:
    registry = CollectorRegistry(auto_describe=True)
    counter = fast_metrics.counter(
        f"{NAMESPACE}_c", "Some count.", ("route", "status"), registry, fast=fast
    )
    histogram = fast_metrics.histogram(
        f"{NAMESPACE}_d_seconds", "Some time.", ("route",), HTTP_BUCKETS, registry, fast=fast
    )
    return registry, counter, histogram


def test_same_exposition_as_prometheus_client() -> None:
    fast, fast_counter, fast_histogram = _pair(fast=True)
    stock, counter, histogram = _pair(fast=False)
    assert isinstance(fast_counter, FastCounter) and isinstance(fast_histogram, FastHistogram)
    assert isinstance(counter.metric, Counter)  # type: ignore[attr-defined]
    assert exposition(stock) == exposition(fast)  # nothing counted yet
    rng = random.Random(7)
    # Values on bucket bounds, between them, past the last one, and zero.
    values = [0.0, 0.001, 0.0025, 0.3, 300.0, 1e6, *HTTP_BUCKETS]
    values += [rng.expovariate(50) for _ in range(500)]
    for i, amount in enumerate(values):
        route, status = f"/r{i % 3}", str(200 + i % 2)
        for family in (counter, fast_counter):
            family.child((route, status)).inc()
        for timing in (histogram, fast_histogram):
            timing.child((route,)).observe(amount)
    assert "agent_bff_d_seconds_bucket" in exposition(fast)
    assert exposition(stock) == exposition(fast)
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        assert not fast_metrics.created_series()
        assert "_created" not in exposition(fast)
        assert exposition(stock) == exposition(fast)
    finally:
        prometheus_client.enable_created_metrics()  # type: ignore[no-untyped-call]
    assert fast_metrics.created_series()


def test_names_collide_as_prometheus_client_names_do() -> None:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(FastCounter(f"{NAMESPACE}_c", "Some count.", ("route",)))
    with pytest.raises(ValueError):
        Counter("c", "Again.", namespace=NAMESPACE, registry=registry)


def test_the_self_check_passes_on_the_installed_prometheus_client() -> None:
    assert fast_metrics.self_check() is None
    assert Metrics(fast=True).fast is True
    assert isinstance(Metrics(fast=True).requests, FastCounter)


def test_fast_paths_off_uses_prometheus_clients_classes() -> None:
    chosen = Metrics(fast=False)
    assert chosen.fast is False
    assert isinstance(chosen.requests, fast_metrics.PublicCounter)
    assert isinstance(chosen.request_duration, fast_metrics.PublicHistogram)


def test_a_failed_self_check_falls_back_to_prometheus_client(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fast histogram that buckets `le` wrongly (as a changed exposition would differ) is
    caught at start-up; the app then counts with prometheus-client's classes."""

    def off_by_one(self: fast_metrics._HistogramCell, amount: float) -> None:
        self.counts[bisect.bisect_right(self._bounds, amount)] += 1.0  # `<`, not `<=`
        self.sum += amount

    monkeypatch.setattr(fast_metrics._HistogramCell, "observe", off_by_one)
    metrics.fast_series_problem.cache_clear()
    try:
        assert fast_metrics.self_check() == (
            "the fast series' exposition differs from prometheus-client's"
        )
        chosen = Metrics(fast=True)
        assert chosen.fast is False
        assert isinstance(chosen.requests, fast_metrics.PublicCounter)
        assert "prometheus-client's own series instead of the fast ones" in caplog.text
    finally:
        metrics.fast_series_problem.cache_clear()


def test_a_self_check_that_raises_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise TypeError("changed API")

    monkeypatch.setattr(fast_metrics, "floatToGoString", broken)
    assert fast_metrics.self_check() == "the fast series failed: TypeError: changed API"
