"""Figures from a recording: the JSON report, the human summary, and threshold checks.

Definitions (also in the README's "Load testing" section):
- `requests`: completed requests of every kind (create, read, write, stream), errors included;
  `rps` = requests / elapsed seconds of the whole run (ramp-up included).
- latency per kind: from sending the request to the last byte of the response; for `stream`,
  to the end of the stream. `ttfe`: sending the request to the first complete SSE event.
  `gap`: between consecutive events of one stream.
- `stream completion ratio`: streams that ended with the end event (and, when the stub says how
  many events it sent, with all of them) / streams attempted.
- errors by kind: `status_<code>`, `timeout`, `connect`, `reset`, `truncated` (stream ended
  early or incomplete), `stream_error` (the gateway sent `event: error`), `bad_body`.
- sessions: `lost` = a check found the session gone or not ours; `stale` = ours but missing the
  last write. Both count against `--max-lost-sessions`.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

from loadkit.runner import KINDS, SESSION_KINDS, LoadConfig, Recorder

REPORT_FORMAT = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """Limits that make the run fail (exit 1). None: not checked."""

    max_p99_ms: float | None = None  # every session request kind (create, read, write)
    max_ttfe_p99_ms: float | None = None  # streams: time to first event
    max_error_rate: float | None = None  # fraction of all requests, 0..1
    max_lost_sessions: int | None = 0  # lost + stale sessions


def build_report(
    recorder: Recorder,
    config: LoadConfig,
    thresholds: Thresholds,
    *,
    client_cpu_seconds: float = 0.0,
) -> dict[str, Any]:
    """The whole run as a JSON-serialisable dict (the `--json` output)."""
    elapsed = recorder.finished if recorder.finished is not None else recorder.now()
    elapsed = max(elapsed, 1e-9)
    total = recorder.total
    errors = recorder.total_errors
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        count = recorder.count[kind]
        kind_errors = sum(n for (k, _), n in recorder.errors.items() if k == kind)
        kinds[kind] = {
            "count": count,
            "ok": recorder.ok[kind],
            "errors": kind_errors,
            "rps": round(count / elapsed, 2),
            "latency_ms": recorder.latency[kind].summary(),
            "hdr": recorder.latency[kind].encoded(),
        }
    by_error: dict[str, int] = {}
    by_kind_error: dict[str, dict[str, int]] = {}
    for (kind, error), n in sorted(recorder.errors.items()):
        by_error[error] = by_error.get(error, 0) + n
        by_kind_error.setdefault(kind, {})[error] = n
    attempted = recorder.count["stream"]
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "tool": "agent-bff loadgen",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(recorder.started_at)),
        "host": platform.node(),
        "config": _config_dict(config),
        "elapsed_s": round(elapsed, 3),
        "requests": total,
        "rps": round(total / elapsed, 2),
        "errors": errors,
        "error_rate": round(errors / total, 6) if total else None,
        "errors_by_kind": by_error,
        "errors_by_request_kind": by_kind_error,
        "aborted_at_deadline": recorder.aborted,
        "kinds": kinds,
        "stream": {
            "attempted": attempted,
            "started": recorder.streams_started,
            "completed": recorder.streams_completed,
            "completion_ratio": round(recorder.streams_completed / attempted, 6)
            if attempted
            else None,
            "events": recorder.stream_events,
            "bytes": recorder.stream_bytes,
            "keepalive_comments": recorder.keepalive_comments,
            "ttfe_ms": recorder.ttfe.summary(),
            "gap_ms": recorder.gaps.summary(),
            "ttfe_hdr": recorder.ttfe.encoded(),
            "gap_hdr": recorder.gaps.encoded(),
        },
        "sessions": {
            "users": config.concurrency,
            "created": recorder.sessions_created,
            "recreated": recorder.sessions_recreated,
            "checks": recorder.checks,
            "lost": recorder.lost,
            "stale": recorder.stale,
            "users_with_loss": len(recorder.users_with_loss),
        },
        "client": {
            "cpu_seconds": round(client_cpu_seconds, 3),
            "cpu_percent_of_one_core": round(100.0 * client_cpu_seconds / elapsed, 1),
        },
        "timeline": {
            "slot_seconds": recorder.timeline.width,
            "series": recorder.timeline.series(elapsed),
        },
    }
    report["thresholds"] = {
        "limits": asdict(thresholds),
        "violations": check_thresholds(report, thresholds),
    }
    report["passed"] = not report["thresholds"]["violations"]
    return report


def _config_dict(config: LoadConfig) -> dict[str, Any]:
    out = asdict(config)
    out["stream_body"] = config.stream_body.decode("utf-8", errors="replace")
    out["mix"] = dict(config.mix)
    # Extra headers may carry credentials: names only.
    out["headers"] = sorted(config.headers)
    return out


def check_thresholds(report: dict[str, Any], limits: Thresholds) -> list[str]:
    """One human sentence per violated limit; empty when the run passes."""
    violations: list[str] = []
    if report["requests"] == 0:
        violations.append("no request completed")
    if limits.max_p99_ms is not None:
        for kind in SESSION_KINDS:
            p99 = report["kinds"][kind]["latency_ms"]["p99"]
            if p99 is not None and p99 > limits.max_p99_ms:
                violations.append(f"{kind} p99 {p99:.2f} ms > --max-p99-ms {limits.max_p99_ms:g}")
    if limits.max_ttfe_p99_ms is not None:
        p99 = report["stream"]["ttfe_ms"]["p99"]
        if p99 is not None and p99 > limits.max_ttfe_p99_ms:
            violations.append(
                f"time to first event p99 {p99:.2f} ms > --max-ttfe-p99-ms "
                f"{limits.max_ttfe_p99_ms:g}"
            )
    if limits.max_error_rate is not None and report["requests"]:
        rate = report["error_rate"]
        if rate > limits.max_error_rate:
            violations.append(
                f"error rate {rate:.4%} > --max-error-rate {limits.max_error_rate:.4%}"
            )
    if limits.max_lost_sessions is not None:
        sessions = report["sessions"]
        lost = sessions["lost"] + sessions["stale"]
        if lost > limits.max_lost_sessions:
            violations.append(
                f"{lost} lost sessions ({sessions['lost']} gone, {sessions['stale']} stale) > "
                f"--max-lost-sessions {limits.max_lost_sessions}"
            )
    return violations


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def format_summary(report: dict[str, Any]) -> str:
    """The human summary printed at the end of a run."""
    cfg = report["config"]
    lines = [
        f"agent-bff loadgen: {cfg['url']} app={cfg['app']} users={cfg['concurrency']} "
        f"duration={cfg['duration']:g}s ramp-up={cfg['ramp_up']:g}s",
        f"  requests {report['requests']}  in {report['elapsed_s']:.1f}s  "
        f"= {report['rps']:.1f} req/s   errors {report['errors']}"
        + (f" ({report['error_rate']:.2%})" if report["error_rate"] is not None else ""),
        "",
        f"  {'kind':<8}{'count':>9}{'errors':>8}{'req/s':>9}"
        f"{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}",
    ]
    for kind, row in report["kinds"].items():
        lat = row["latency_ms"]
        lines.append(
            f"  {kind:<8}{row['count']:>9}{row['errors']:>8}{row['rps']:>9.1f}"
            f"{_ms(lat['p50']):>10}{_ms(lat['p90']):>10}{_ms(lat['p99']):>10}{_ms(lat['max']):>10}"
        )
    stream = report["stream"]
    if stream["attempted"]:
        ttfe, gap = stream["ttfe_ms"], stream["gap_ms"]
        ratio = stream["completion_ratio"]
        lines += [
            "",
            f"  streams  {stream['completed']}/{stream['attempted']} completed ({ratio:.2%}), "
            f"{stream['events']} events, {stream['bytes']} bytes",
            f"  time to first event  p50 {_ms(ttfe['p50'])}  p90 {_ms(ttfe['p90'])}  "
            f"p99 {_ms(ttfe['p99'])}  max {_ms(ttfe['max'])} ms",
            f"  gap between events   p50 {_ms(gap['p50'])}  p90 {_ms(gap['p90'])}  "
            f"p99 {_ms(gap['p99'])}  max {_ms(gap['max'])} ms",
        ]
    if report["errors_by_kind"]:
        lines += [
            "",
            "  errors by kind: "
            + ", ".join(f"{k} {v}" for k, v in report["errors_by_kind"].items()),
        ]
    s = report["sessions"]
    lines += [
        "",
        f"  sessions  created {s['created']}  checks {s['checks']}  lost {s['lost']}  "
        f"stale {s['stale']}  (users affected {s['users_with_loss']}, re-created "
        f"{s['recreated']})",
    ]
    if report["aborted_at_deadline"]:
        lines.append(f"  aborted at the hard deadline: {report['aborted_at_deadline']} requests")
    cpu = report["client"]["cpu_percent_of_one_core"]
    lines.append(f"  load generator CPU: {cpu:.0f}% of one core")
    if cpu >= 90:
        lines.append(
            "  warning: the load generator was CPU-bound; the gateway may have more headroom "
            "than these figures show (use fewer users, or run several loadgen processes)"
        )
    violations = report["thresholds"]["violations"]
    lines.append("")
    if violations:
        lines.append("  FAILED: " + "; ".join(violations))
    else:
        lines.append("  passed")
    return "\n".join(lines)
