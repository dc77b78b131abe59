"""The lock-free per-request series export exactly what prometheus-client's own would."""

from __future__ import annotations

import random
import re

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from app.metrics import HTTP_BUCKETS, NAMESPACE, FastCounter, FastHistogram


def _exposition(registry: CollectorRegistry) -> str:
    """The text format with creation timestamps blanked (they differ by construction)."""
    text = generate_latest(registry).decode()
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", text)


def _pair() -> tuple[
    CollectorRegistry, Counter, Histogram, CollectorRegistry, FastCounter, FastHistogram
]:
    stock = CollectorRegistry()
    counter = Counter("c", "Some count.", ["route", "status"], namespace=NAMESPACE, registry=stock)
    histogram = Histogram(
        "d_seconds",
        "Some time.",
        ["route"],
        namespace=NAMESPACE,
        buckets=HTTP_BUCKETS,
        registry=stock,
    )
    fast = CollectorRegistry(auto_describe=True)
    fast_counter = FastCounter("c", "Some count.", ("route", "status"))
    fast_histogram = FastHistogram("d_seconds", "Some time.", ("route",), HTTP_BUCKETS)
    fast.register(fast_counter)
    fast.register(fast_histogram)
    return stock, counter, histogram, fast, fast_counter, fast_histogram


def test_same_exposition_as_prometheus_client() -> None:
    stock, counter, histogram, fast, fast_counter, fast_histogram = _pair()
    assert _exposition(stock) == _exposition(fast)  # nothing counted yet
    rng = random.Random(7)
    # Values on bucket bounds, between them, past the last one, and zero.
    values = [0.0, 0.001, 0.0025, 0.3, 300.0, 1e6, *HTTP_BUCKETS]
    values += [rng.expovariate(50) for _ in range(500)]
    for i, amount in enumerate(values):
        route, status = f"/r{i % 3}", str(200 + i % 2)
        counter.labels(route, status).inc()
        fast_counter.cell((route, status))[0] += 1.0
        histogram.labels(route).observe(amount)
        fast_histogram.observe(fast_histogram.cell((route,)), amount)
    assert _exposition(stock) == _exposition(fast)
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        assert "_created" not in _exposition(fast)
        assert _exposition(stock) == _exposition(fast)
    finally:
        prometheus_client.enable_created_metrics()  # type: ignore[no-untyped-call]


def test_names_collide_as_prometheus_client_names_do() -> None:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(FastCounter("c", "Some count.", ("route",)))
    try:
        Counter("c", "Again.", namespace=NAMESPACE, registry=registry)
    except ValueError:
        return
    raise AssertionError("a duplicate series name was accepted")
