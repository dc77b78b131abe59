"""The figures of a concurrency run (app/loadkit/concurrency.py): what the client saw
(`Tally`), the gateway's samples (`Sample`), and the summary made of them (`summarize`,
`format_summary`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.loadkit.concurrency import ScaleOptions


@dataclass(slots=True)
class Sample:
    t: float
    open: int
    events: int
    rss_mb: float
    cpu_s: float
    at_ns: int


@dataclass(slots=True)
class Tally:
    """What the client saw, across all streams."""

    open: int = 0
    events: int = 0
    completed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    delivery_ns: list[int] = field(default_factory=list)
    arrival_ns: list[int] = field(default_factory=list)  # beside delivery_ns, when it came
    open_at_dump: int | None = None  # streams open when the tracemalloc snapshot was asked for
    open_s: list[float] = field(default_factory=list)  # request sent -> response head


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def summarize(
    o: ScaleOptions,
    tally: Tally,
    samples: list[Sample],
    *,
    idle_rss: float,
    wall: float,
    total_cpu: float,
) -> dict[str, Any]:
    """The figures of a run (see the module docstring)."""
    peak = max((s.open for s in samples), default=0)
    plateau = [s for s in samples if s.open == peak and peak > 0]
    plateau_rss = max((s.rss_mb for s in plateau), default=idle_rss)
    per_stream_kb = (plateau_rss - idle_rss) * 1024 / peak if peak else float("nan")
    delivery = sorted(ns / 1e6 for ns in tally.delivery_ns)
    opens = sorted(t * 1000 for t in tally.open_s)
    # CPU per event over the samples with at least 90% of the peak open (the peak itself may
    # last one sample only while the last streams open and the first ones end).
    busy = [s for s in samples if peak > 0 and s.open >= 0.9 * peak]
    if len(busy) >= 2:
        first, last = busy[0], busy[-1]
        window_cpu = last.cpu_s - first.cpu_s
        window_events = last.events - first.events
        window_wall = last.t - first.t
        steady = sorted(
            d / 1e6
            for d, at in zip(tally.delivery_ns, tally.arrival_ns, strict=True)
            if first.at_ns <= at <= last.at_ns
        )
    else:
        window_cpu = window_events = window_wall = 0
        steady = []
    cpu_us_per_event = window_cpu * 1e6 / window_events if window_events else float("nan")
    return {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()},
        "streams": o.streams,
        "completed": tally.completed,
        "failures": dict(tally.failures),
        "peak_open": peak,
        "idle_rss_mb": round(idle_rss, 1),
        "plateau_rss_mb": round(plateau_rss, 1),
        "rss_kb_per_open_stream": round(per_stream_kb, 2),
        "streams_per_gib": round(1024 * 1024 / per_stream_kb) if per_stream_kb > 0 else None,
        "events_delivered": tally.events,
        "delivery_ms": {
            "p50": round(_percentile(delivery, 0.50), 2),
            "p99": round(_percentile(delivery, 0.99), 2),
            "max": round(delivery[-1], 2) if delivery else None,
        },
        "delivery_ms_busy": {
            "p50": round(_percentile(steady, 0.50), 2),
            "p99": round(_percentile(steady, 0.99), 2),
            "events": len(steady),
        },
        "open_ms": {
            "p50": round(_percentile(opens, 0.50), 1),
            "p99": round(_percentile(opens, 0.99), 1),
        },
        "busy_seconds": round(window_wall, 2),
        "busy_gateway_cpu_share": round(window_cpu / window_wall, 3) if window_wall else None,
        "busy_cpu_us_per_event": round(cpu_us_per_event, 1),
        "events_per_core_second": (
            round(1e6 / cpu_us_per_event) if window_events and window_cpu > 0 else None
        ),
        "tracemalloc_open_streams": tally.open_at_dump,
        "run_seconds": round(wall, 2),
        "run_gateway_cpu_seconds": round(total_cpu, 2),
        "samples": [asdict(s) for s in samples],
    }


def format_summary(r: dict[str, Any]) -> str:
    d = r["delivery_ms"]
    return "\n".join(
        [
            f"streams: {r['completed']}/{r['streams']} completed, peak {r['peak_open']} open at "
            f"once, failures {r['failures'] or 'none'}",
            f"gateway RSS: idle {r['idle_rss_mb']} MB, plateau {r['plateau_rss_mb']} MB -> "
            f"{r['rss_kb_per_open_stream']} KB per open stream ({r['streams_per_gib']} per GiB)",
            f"event delivery (stub write -> client): p50 {d['p50']} ms, p99 {d['p99']} ms, "
            f"max {d['max']} ms over {r['events_delivered']} events; stream opening "
            f"(request -> response head) p50 {r['open_ms']['p50']} ms, "
            f"p99 {r['open_ms']['p99']} ms",
            f"event delivery while >= 90% of the peak was open: p50 "
            f"{r['delivery_ms_busy']['p50']} ms, p99 {r['delivery_ms_busy']['p99']} ms",
            f"gateway CPU while >= 90% of the peak was open ({r['busy_seconds']} s): "
            f"{r['busy_gateway_cpu_share']} of a core, {r['busy_cpu_us_per_event']} us per "
            f"event -> {r['events_per_core_second']} events/s per core",
            f"run: {r['run_seconds']} s; CPU seconds in all: gateway "
            f"{r['run_gateway_cpu_seconds']}, stub {r.get('stub_cpu_seconds')}, client "
            f"{r.get('client_cpu_seconds')}",
        ]
    )
