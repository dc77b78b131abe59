"""The per-request Prometheus series, fenced: plain numbers, or prometheus-client's own.

Every request updates a counter and a histogram (`http_requests_total`,
`http_request_duration_seconds`) and, through the session store, another pair
(`session_store_operations_total`, `session_store_operation_duration_seconds`). Two
implementations give the same series (`counter`, `histogram`; the caller keeps the children):

- fast (`FastCounter`, `FastHistogram`): custom collectors (prometheus-client's public collector
  API) holding plain numbers, no lock and no per-update `labels()` lookup; only the event loop's
  thread updates them and a scrape runs there too. They re-implement the exposition of
  `Counter`/`Histogram` (`_total`, `_bucket` with prometheus-client's `le` text, `_count`,
  `_sum`, `_created`), which is what `self_check` compares at start-up;
- public: prometheus-client's `Counter`/`Histogram`, each labelled child cached.

Measured gain (why the fast path exists): one counter increment and one histogram
observation on a cached child, 1.83 us with prometheus-client 0.26 against 0.35 us here (its
children take a lock per `inc` and walk the buckets in Python; `timeit`, best of 7); a request
updates two such pairs (request and store). Gateway CPU per request, one bench run with only
this fast path switched (2026-12-03, shared 2-core VM): memory-store read 96 us against 106 us
with prometheus-client's classes (-9%), Redis read 150 against 158 us (-5%):

    .venv/bin/python scripts/bench.py --rows \
        gw_mem_read,gw_mem_read_public,gw_redis_read,gw_redis_read_public --reps 3 --seconds 5

(the `_public` rows run `FAST_PATHS=off`; docs/observability.md, "Fast paths").

Switch: `FAST_PATHS=off` (Settings.fast_paths) forces the public path; `auto` (the default)
takes the fast path when `self_check()` passes at start-up and logs why when it does not.
"""

from __future__ import annotations

import bisect
import math
import random
import re
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.utils import floatToGoString


class CounterChild(Protocol):
    def inc(self, amount: float = 1.0) -> None: ...


class HistogramChild(Protocol):
    def observe(self, amount: float) -> None: ...


class CounterFamily(Protocol):
    def child(self, labels: tuple[str, ...]) -> CounterChild: ...


class HistogramFamily(Protocol):
    def child(self, labels: tuple[str, ...]) -> HistogramChild: ...


def created_series() -> bool:
    """Whether prometheus-client exports `_created` samples now (its switch:
    `PROMETHEUS_DISABLE_CREATED_SERIES`, `disable_created_metrics()`), asked through its public
    API: does an unregistered `Counter` export one?"""
    probe = Counter("agent_bff_created_probe", "Probe.", registry=None)
    return any(s.name.endswith("_created") for m in probe.collect() for s in m.samples)


class _Cell:
    __slots__ = ("created",)

    def __init__(self) -> None:
        self.created = time.time()


class _CounterCell(_Cell):
    __slots__ = ("value",)

    def __init__(self) -> None:
        super().__init__()
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramCell(_Cell):
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        super().__init__()
        self._bounds = bounds
        self.counts = [0.0] * len(bounds)  # per bucket, not cumulative
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is >= amount (the `le` semantics).
        self.counts[bisect.bisect_left(self._bounds, amount)] += 1.0
        self.sum += amount


_CellT = TypeVar("_CellT", bound=_Cell)


class _FastFamily(Generic[_CellT]):
    """A labelled family of `kind` kept as plain numbers: one cell per label values
    (`child(labels)`: create it once, keep it; subclasses make a fresh one with `_new_cell`);
    `collect` adds each cell's samples (`_add_samples`) and its `_created` one when
    prometheus-client exports those."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._cells: dict[tuple[str, ...], _CellT] = {}

    def child(self, labels: tuple[str, ...]) -> _CellT:
        cell = self._cells.get(labels)
        if cell is None:
            cell = self._cells[labels] = self._new_cell()
        return cell

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, self.kind)]

    def collect(self) -> list[Metric]:
        metric = Metric(self.name, self.documentation, self.kind)
        created = created_series()
        for labels, cell in list(self._cells.items()):
            names = dict(zip(self.labelnames, labels, strict=True))
            self._add_samples(metric, names, cell)
            if created:
                metric.add_sample(self.name + "_created", dict(names), cell.created)
        return [metric]

    def _new_cell(self) -> _CellT:
        raise NotImplementedError

    def _add_samples(self, metric: Metric, names: dict[str, str], cell: _CellT) -> None:
        raise NotImplementedError


class FastCounter(_FastFamily[_CounterCell]):
    """A labelled counter kept as plain numbers, exported as prometheus-client's `Counter`
    exports it (`_total`, `_created`). `child(labels)` is the series (create it once, keep it)."""

    kind = "counter"

    def _new_cell(self) -> _CounterCell:
        return _CounterCell()

    def _add_samples(self, metric: Metric, names: dict[str, str], cell: _CounterCell) -> None:
        metric.add_sample(self.name + "_total", names, cell.value)


class FastHistogram(_FastFamily[_HistogramCell]):
    """A labelled histogram kept as plain numbers, exported as prometheus-client's
    `Histogram` exports it (`_bucket`, `_count`, `_sum`, `_created`)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...],
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds) or not bounds or bounds[0] < 0:
            raise ValueError("buckets must be sorted and non-negative")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        super().__init__(name, documentation, labelnames)
        self._bounds = bounds
        # The `le` labels exactly as prometheus-client writes them.
        self._le: list[str] = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]

    def _new_cell(self) -> _HistogramCell:
        return _HistogramCell(self._bounds)

    def _add_samples(self, metric: Metric, names: dict[str, str], cell: _HistogramCell) -> None:
        total = 0.0
        for le, count in zip(self._le, cell.counts, strict=True):
            total += count
            metric.add_sample(self.name + "_bucket", {**names, "le": le}, total)
        metric.add_sample(self.name + "_count", dict(names), total)
        metric.add_sample(self.name + "_sum", dict(names), cell.sum)


_ChildT = TypeVar("_ChildT")


class _CachedChildren(Generic[_ChildT]):
    """prometheus-client's labelled children (`labelled(*labels)`), each made once."""

    def __init__(self, labelled: Callable[..., _ChildT]) -> None:
        self._labelled = labelled
        self._children: dict[tuple[str, ...], _ChildT] = {}

    def child(self, labels: tuple[str, ...]) -> _ChildT:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._labelled(*labels)
        return child


class PublicCounter(_CachedChildren[CounterChild]):
    """prometheus-client's `Counter` (`metric`), its labelled children cached (`labels()`
    costs ~4 us)."""

    def __init__(self, metric: Counter) -> None:
        self.metric = metric
        super().__init__(metric.labels)


class PublicHistogram(_CachedChildren[HistogramChild]):
    """prometheus-client's `Histogram` (`metric`), its labelled children cached."""

    def __init__(self, metric: Histogram) -> None:
        self.metric = metric
        super().__init__(metric.labels)


def counter(
    name: str,
    documentation: str,
    labelnames: tuple[str, ...],
    registry: CollectorRegistry,
    *,
    fast: bool,
) -> CounterFamily:
    """A labelled counter `name` (full name, without `_total`) in `registry`: `FastCounter`
    when `fast`, else prometheus-client's `Counter`."""
    if not fast:
        return PublicCounter(Counter(name, documentation, labelnames, registry=registry))
    family = FastCounter(name, documentation, labelnames)
    registry.register(family)
    return family


def histogram(
    name: str,
    documentation: str,
    labelnames: tuple[str, ...],
    buckets: tuple[float, ...],
    registry: CollectorRegistry,
    *,
    fast: bool,
) -> HistogramFamily:
    """A labelled histogram `name` in `registry`: `FastHistogram` when `fast`, else
    prometheus-client's `Histogram`."""
    if not fast:
        metric = Histogram(name, documentation, labelnames, buckets=buckets, registry=registry)
        return PublicHistogram(metric)
    family = FastHistogram(name, documentation, labelnames, buckets)
    registry.register(family)
    return family


_CHECK_BUCKETS = (0.001, 0.0025, 0.01, 0.5, 1, 60)


def exposition(registry: CollectorRegistry) -> str:
    """`registry` in the text format, creation timestamps blanked (they differ by nature)."""
    text = generate_latest(registry).decode()
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", text)


def self_check() -> str | None:
    """None when the fast series export exactly what prometheus-client's own do for the same
    updates (values on bucket bounds, between them, past the last one, zero); otherwise what
    differs. Run once at start-up (`Metrics`), about a millisecond."""
    try:
        families = []
        for fast in (True, False):
            registry = CollectorRegistry(auto_describe=True)
            families.append(
                (
                    registry,
                    counter("check", "Check.", ("route", "status"), registry, fast=fast),
                    histogram(
                        "check_seconds", "Check.", ("route",), _CHECK_BUCKETS, registry, fast=fast
                    ),
                )
            )
        rng = random.Random(7)
        values = [0.0, 0.001, 0.0025, 0.3, 60.0, 1e6, *_CHECK_BUCKETS]
        values += [rng.expovariate(50) for _ in range(50)]
        for i, amount in enumerate(values):
            route, status = f"/r{i % 3}", str(200 + i % 2)
            for _, count, observe in families:
                count.child((route, status)).inc()
                observe.child((route,)).observe(amount)
        fast_text, public_text = (exposition(registry) for registry, _, _ in families)
    except Exception as err:  # a changed prometheus-client API: the public path still works
        return f"the fast series failed: {type(err).__name__}: {err}"
    if fast_text != public_text:
        return "the fast series' exposition differs from prometheus-client's"
    return None
