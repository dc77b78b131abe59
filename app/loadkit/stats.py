"""Latency recording: HDR histograms per request kind, plus a coarse timeline for plots.

Values are recorded in microseconds into `hdrh` histograms (3 significant figures from 1 µs to
one hour), so p99 and max are exact to 0.1% however long the run is and memory stays constant.
The timeline keeps one small histogram (2 significant figures) per kind per time slot; the slot
width grows with the planned duration so at most `MAX_SLOTS` slots ever exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour: a stream can be long
SIGNIFICANT_FIGURES = 3
TIMELINE_HIGHEST_US = 600_000_000
TIMELINE_FIGURES = 2
MAX_SLOTS = 240
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def new_histogram(highest_us: int = HIGHEST_US, figures: int = SIGNIFICANT_FIGURES) -> Any:
    return HdrHistogram(LOWEST_US, highest_us, figures)


def to_us(seconds: float, highest_us: int = HIGHEST_US) -> int:
    """Seconds as whole microseconds, clamped into the histogram's range."""
    return min(max(LOWEST_US, round(seconds * 1_000_000)), highest_us)


class Latency:
    """One HDR histogram of durations, summarised in milliseconds."""

    def __init__(self) -> None:
        self.hist: Any = new_histogram()

    def record(self, seconds: float) -> None:
        self.hist.record_value(to_us(seconds))

    @property
    def count(self) -> int:
        return int(self.hist.get_total_count())

    def percentile_ms(self, percentile: float) -> float:
        return float(self.hist.get_value_at_percentile(percentile)) / 1000.0

    def summary(self) -> dict[str, Any]:
        """`{"count", "min", "mean", "p50", "p90", "p99", "p99.9", "max"}` in milliseconds;
        `None` figures when nothing was recorded."""
        count = self.count
        if count == 0:
            keys = ["min", "mean", *(f"p{p:g}" for p in PERCENTILES), "max"]
            return {"count": 0, **dict.fromkeys(keys)}
        out: dict[str, Any] = {
            "count": count,
            "min": round(float(self.hist.get_min_value()) / 1000.0, 3),
            "mean": round(float(self.hist.get_mean_value()) / 1000.0, 3),
        }
        for p in PERCENTILES:
            out[f"p{p:g}"] = round(self.percentile_ms(p), 3)
        out["max"] = round(float(self.hist.get_max_value()) / 1000.0, 3)
        return out

    def encoded(self) -> str:
        """The histogram in HdrHistogram's compressed base64 form (mergeable across runs)."""
        return str(self.hist.encode().decode("ascii"))

    def distribution(self) -> list[tuple[float, float]]:
        """(percentile, latency ms) points for a percentile-distribution plot."""
        if self.count == 0:
            return []
        points: list[tuple[float, float]] = []
        for item in self.hist.get_percentile_iterator(5):
            points.append((float(item.percentile_level_iterated_to), item.value_iterated_to / 1e3))
        return points


@dataclass(slots=True)
class Slot:
    """One timeline slot for one kind."""

    count: int = 0
    errors: int = 0
    hist: Any = field(default_factory=lambda: new_histogram(TIMELINE_HIGHEST_US, TIMELINE_FIGURES))


class Timeline:
    """Per-kind, per-slot counts and latency histograms (for latency-over-time plots)."""

    def __init__(self, planned_seconds: float) -> None:
        self.width = max(1.0, math.ceil(planned_seconds / MAX_SLOTS))
        self.slots: dict[str, dict[int, Slot]] = {}

    def record(self, kind: str, at: float, seconds: float | None) -> None:
        """`at`: seconds since the run started; `seconds`: latency, None for an error."""
        index = min(int(at // self.width), MAX_SLOTS * 4)
        slot = self.slots.setdefault(kind, {}).get(index)
        if slot is None:
            slot = self.slots[kind][index] = Slot()
        slot.count += 1
        if seconds is None:
            slot.errors += 1
        else:
            slot.hist.record_value(to_us(seconds, TIMELINE_HIGHEST_US))

    def series(self, elapsed: float | None = None) -> dict[str, list[dict[str, Any]]]:
        """Per kind: `[{"t", "count", "errors", "rps", "p50", "p99", "max"}]` (ms), sorted.

        `t` is the slot's start; `rps` of the slot that holds `elapsed` (the run's end) counts
        only the part of it that the run covered.
        """
        out: dict[str, list[dict[str, Any]]] = {}
        for kind, slots in self.slots.items():
            rows = []
            for index in sorted(slots):
                slot = slots[index]
                ok = slot.hist.get_total_count()
                start = index * self.width
                covered = self.width
                if elapsed is not None and start < elapsed < start + self.width:
                    covered = max(elapsed - start, 0.1)
                rows.append(
                    {
                        "t": start,
                        "count": slot.count,
                        "errors": slot.errors,
                        "rps": round(slot.count / covered, 2),
                        "p50": slot.hist.get_value_at_percentile(50) / 1e3 if ok else None,
                        "p99": slot.hist.get_value_at_percentile(99) / 1e3 if ok else None,
                        "max": slot.hist.get_max_value() / 1e3 if ok else None,
                    }
                )
            out[kind] = rows
        return out
