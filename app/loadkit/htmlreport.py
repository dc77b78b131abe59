"""`--html`: one self-contained HTML file (summary tables and PNG plots embedded as base64).

Built from the JSON report alone (the HDR histograms travel in it, encoded), so a saved
`--json` report can be rendered again later with `write_html(json.load(f), path)`.
Plots: latency over time (p50 and p99 per slot, per kind; throughput and errors below) and
the latency distribution (HDR percentile plot: the tail is visible, not averaged away).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram
from matplotlib.axes import Axes

# The object-oriented API (Figure, no pyplot): no global state, no display backend needed.
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator

# Gaps between events that arrived in one network read are ~0 (recorded as 1 µs): drawn at this
# floor instead, so they do not stretch the log axis down to 0.001 ms.
GAP_FLOOR_MS = 0.01
THRESHOLD_COLOR = "#c62828"

COLORS = {
    "create": "#8c564b",
    "read": "#1f77b4",
    "write": "#ff7f0e",
    "stream": "#2ca02c",
    "ttfe": "#d62728",
    "gap": "#9467bd",
}


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _legend_outside(ax: Axes, **kwargs: Any) -> None:
    """The legend to the right of the axes: it never hides a line."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)


def _threshold_lines(ax: Axes, report: dict[str, Any]) -> None:
    """Horizontal lines at the latency limits the run was gated on."""
    limits = report["thresholds"]["limits"]
    for key, label in (("max_p99_ms", "--max-p99-ms"), ("max_ttfe_p99_ms", "--max-ttfe-p99-ms")):
        value = limits.get(key)
        if value is not None:
            ax.axhline(
                value,
                color=THRESHOLD_COLOR,
                linestyle=":",
                linewidth=1.5,
                label=f"{label} {value:g} ms",
            )


def _log_ms_axis(ax: Axes) -> None:
    """A log latency axis labelled 1, 2, 5, 10, 20, 50 ... (plain numbers, not 10^x)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))


def latency_over_time(report: dict[str, Any]) -> str:
    """PNG (base64): p50/p99 per slot and kind, and requests/s + errors per slot."""
    return _png(latency_over_time_figure(report))


def latency_over_time_figure(report: dict[str, Any]) -> Figure:
    """The figure of `latency_over_time`: latency axes on top, throughput below."""
    series: dict[str, list[dict[str, Any]]] = report["timeline"]["series"]
    fig = Figure(figsize=(10, 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    width = float(report["timeline"]["slot_seconds"])
    for kind, rows in series.items():
        color = COLORS.get(kind, "#333333")
        # Each slot is drawn at its middle; markers keep one-slot kinds (create) visible.
        timed = [r for r in rows if r["p50"] is not None]
        xs = [r["t"] + width / 2 for r in timed]
        style = {"color": color, "marker": "o", "markersize": 2.5}
        top.plot(xs, [r["p50"] for r in timed], label=f"{kind} p50", **style)
        top.plot(xs, [r["p99"] for r in timed], linestyle="--", label=f"{kind} p99", **style)
        if kind != "ttfe":
            bottom.plot(
                [r["t"] + width / 2 for r in rows], [r["rps"] for r in rows], label=kind, **style
            )
    errors: dict[float, float] = {}
    for kind, rows in series.items():
        if kind == "ttfe":
            continue
        for r in rows:
            middle = r["t"] + width / 2
            errors[middle] = errors.get(middle, 0.0) + r["errors"] / width
    if any(errors.values()):
        ts = sorted(errors)
        bottom.bar(
            ts,
            [errors[t] for t in ts],
            width=width * 0.8,
            color="#d62728",
            alpha=0.4,
            label="errors/s",
        )
    _threshold_lines(top, report)
    top.set_ylabel("latency (ms)")
    _log_ms_axis(top)
    top.grid(True, which="both", alpha=0.3)
    _legend_outside(top, fontsize=8)
    top.set_title("Latency over time (ttfe = time to first streamed event)")
    bottom.set_ylabel("requests/s")
    bottom.set_xlabel(f"seconds since start (slots of {width:g} s)")
    bottom.grid(True, alpha=0.3)
    _legend_outside(bottom, fontsize=8)
    return fig


def _distribution(encoded: str) -> list[tuple[float, float]]:
    hist: Any = HdrHistogram.decode(encoded)
    count = 0 if hist is None else int(hist.get_total_count())
    if count == 0:
        return []
    # The percentile iterator ends at 100%, infinitely far right on a 1/(1-p) axis: the last
    # point is drawn at the finest percentile this many samples can resolve instead.
    finest = 100.0 * (1.0 - 1.0 / max(count, 2))
    points = []
    for item in hist.get_percentile_iterator(5):
        percentile = min(float(item.percentile_level_iterated_to), finest)
        points.append((percentile, item.value_iterated_to / 1000.0))
        if percentile >= finest:
            break
    return points


def latency_distribution(report: dict[str, Any]) -> str:
    """PNG (base64): latency by percentile on a 1/(1-p) axis, per kind, TTFE and gaps."""
    return _png(latency_distribution_figure(report))


def latency_distribution_figure(report: dict[str, Any]) -> Figure:
    """The figure of `latency_distribution` (one axes)."""
    histograms = {kind: row["hdr"] for kind, row in report["kinds"].items()}
    histograms["ttfe"] = report["stream"]["ttfe_hdr"]
    histograms["gap"] = report["stream"]["gap_hdr"]
    fig = Figure(figsize=(10, 5))
    ax = fig.subplots()
    for kind, encoded in histograms.items():
        points = _distribution(encoded)
        if not points:
            continue
        xs = [1.0 / (1.0 - p / 100.0) for p, _ in points]
        ys = [v for _, v in points]
        label = kind
        if kind == "gap" and min(ys) < GAP_FLOOR_MS:
            ys = [max(v, GAP_FLOOR_MS) for v in ys]
            label = f"gap (< {GAP_FLOOR_MS:g} ms drawn at {GAP_FLOOR_MS:g}: same network read)"
        ax.plot(xs, ys, color=COLORS.get(kind, "#333333"), label=label)
    _threshold_lines(ax, report)
    ax.set_xscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000]
    labels = ["0%", "50%", "90%", "99%", "99.9%", "99.99%"]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    names = dict(zip(ticks, labels, strict=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: names.get(round(x), "")))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    _log_ms_axis(ax)
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax, fontsize=8)
    ax.set_title("Latency distribution (HDR histogram percentiles)")
    return fig


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape('-' if c is None else str(c))}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _config_value(value: Any) -> str:
    """One configuration value as people write it on the command line."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return (
            ", ".join(
                f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()
            )
            or "-"
        )
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def config_rows(report: dict[str, Any]) -> list[list[Any]]:
    """The run's configuration and limits as (setting, value) rows."""
    rows: list[list[Any]] = [[key, _config_value(value)] for key, value in report["config"].items()]
    for key, value in report["thresholds"]["limits"].items():
        rows.append([f"threshold: {key}", _config_value(value)])
    return rows


def render_html(report: dict[str, Any]) -> str:
    cfg = report["config"]
    kinds = [
        [kind, r["count"], r["errors"], r["rps"]]
        + [r["latency_ms"][k] for k in ("p50", "p90", "p99", "p99.9", "max")]
        for kind, r in report["kinds"].items()
    ]
    stream = report["stream"]
    for label, key in (("time to first event", "ttfe_ms"), ("gap between events", "gap_ms")):
        s = stream[key]
        kinds.append(
            [label, s["count"], "", ""] + [s[k] for k in ("p50", "p90", "p99", "p99.9", "max")]
        )
    sessions = report["sessions"]
    violations = report["thresholds"]["violations"]
    verdict = (
        '<p class="fail">FAILED: ' + html.escape("; ".join(violations)) + "</p>"
        if violations
        else '<p class="pass">passed all thresholds</p>'
    )
    errors = (
        _table(["error kind", "count"], [[k, v] for k, v in report["errors_by_kind"].items()])
        if report["errors_by_kind"]
        else "<p>none</p>"
    )
    ratio = stream["completion_ratio"]
    completion = "" if ratio is None else f" ({ratio:.2%})"
    error_rate = "" if report["error_rate"] is None else f" ({report['error_rate']:.2%})"
    notes = "".join(
        f'<p class="note">{html.escape(note)}</p>'
        for note in report["thresholds"].get("not_checked", [])
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>agent-bff load test {html.escape(report["started_at"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 72em;
  color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; max-width: 100%; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right;
  overflow-wrap: anywhere; }}
th:first-child, td:first-child {{ text-align: left; }}
table.config th, table.config td {{ text-align: left; }}
table.config td:first-child {{ white-space: nowrap; overflow-wrap: normal; }}
table.config td:last-child {{ font-family: ui-monospace, monospace; }}
.pass {{ color: #1a7f37; font-weight: bold; }} .fail {{ color: #c62828; font-weight: bold; }}
.note {{ color: #555; }}
img {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>agent-bff load test</h1>
<p>{html.escape(cfg["url"])} &middot; application <b>{html.escape(cfg["app"])}</b> &middot;
{cfg["concurrency"]} users &middot; {cfg["duration"]:g} s (ramp-up {cfg["ramp_up"]:g} s) &middot;
started {html.escape(report["started_at"])} on {html.escape(report["host"])}</p>
{verdict}
{notes}
<p><b>{report["requests"]}</b> requests in {report["elapsed_s"]:.1f} s =
<b>{report["rps"]:.1f} req/s</b>; errors {report["errors"]}{error_rate};
streams completed {stream["completed"]}/{stream["attempted"]}{completion};
sessions lost {sessions["lost"]}, stale {sessions["stale"]} of {sessions["checks"]} checks.</p>
<h2>Latency (ms)</h2>
{_table(["kind", "count", "errors", "req/s", "p50", "p90", "p99", "p99.9", "max"], kinds)}
<h2>Errors by kind</h2>
{errors}
<h2>Latency over time</h2>
<img alt="latency over time" src="data:image/png;base64,{latency_over_time(report)}">
<h2>Latency distribution</h2>
<img alt="latency distribution" src="data:image/png;base64,{latency_distribution(report)}">
<h2>Configuration</h2>
{_table(["setting", "value"], config_rows(report)).replace("<table>", '<table class="config">', 1)}
</body></html>
"""


def write_html(report: dict[str, Any], path: Path) -> None:
    path.write_text(render_html(report), encoding="utf-8")
