"""Figures from a recording: the JSON report, the human summary, and threshold checks.

Definitions (also in the README's "Load testing" section):
- `requests`: completed requests of every kind (create, read, write, stream), errors included;
  `rps` = requests / elapsed seconds of the whole run (ramp-up included).
- latency per kind: from sending the request to the last byte of the response; for `stream`,
  to the end of the stream. `ttfe`: sending the request to the first complete SSE event.
  `gap`: between consecutive events of one stream.
- `resume` (kind `resume`): runs cut after a random number of events and resumed with
  `Last-Event-ID`; `lost_events` / `duplicated_events` (gateway ids missing or repeated, in
  runs whose pumping replica lived) fail the run when not 0; `orphaned` counts runs whose
  pumping replica died (`event: error` `run_orphaned`).
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

from app.loadkit.recording import KINDS, SESSION_KINDS, LoadConfig, Recorder

REPORT_FORMAT = 1


# A run where more than 1% of the requests fail is not a passing run unless the user says so
# (`--max-error-rate none`): a 100%-error run used to report "passed".
DEFAULT_MAX_ERROR_RATE = 0.01
# A p99 needs about 100 samples to be more than the maximum of a handful: percentile thresholds
# skip (and say so) kinds with fewer samples, e.g. the one create per user of a short run.
DEFAULT_MIN_SAMPLES = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """Limits that make the run fail (exit 1). None: not checked.

    Always checked as well: at least one request completed, and when streams were attempted,
    at least one of them completed.
    """

    max_p99_ms: float | None = None  # every session request kind (create, read, write)
    max_ttfe_p99_ms: float | None = None  # streams: time to first event
    max_error_rate: float | None = DEFAULT_MAX_ERROR_RATE  # fraction of all requests, 0..1
    max_lost_sessions: int | None = 0  # lost + stale sessions
    min_samples: int = DEFAULT_MIN_SAMPLES  # percentile thresholds need this many samples


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
        "resume": {
            "runs": recorder.resume.runs,
            "unresumable": recorder.resume.unresumable,
            "resume_requests": recorder.resume.resumed,
            "completed": recorder.resume.completed,
            "lost_events": recorder.resume.lost,
            "duplicated_events": recorder.resume.duplicated,
            "orphaned": recorder.resume.orphaned,
            "error_events": dict(recorder.resume.error_events),
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
        "not_checked": unchecked_percentiles(report, thresholds),
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


def _percentile_checks(
    report: dict[str, Any], limits: Thresholds
) -> list[tuple[str, dict[str, Any], float, str]]:
    """(label, latency summary, limit, option) of every percentile threshold that is set."""
    checks: list[tuple[str, dict[str, Any], float, str]] = []
    if limits.max_p99_ms is not None:
        for kind in SESSION_KINDS:
            checks.append(
                (kind, report["kinds"][kind]["latency_ms"], limits.max_p99_ms, "--max-p99-ms")
            )
    if limits.max_ttfe_p99_ms is not None:
        checks.append(
            (
                "time to first event",
                report["stream"]["ttfe_ms"],
                limits.max_ttfe_p99_ms,
                "--max-ttfe-p99-ms",
            )
        )
    return checks


def unchecked_percentiles(report: dict[str, Any], limits: Thresholds) -> list[str]:
    """One sentence per percentile threshold skipped for lack of samples (not a failure)."""
    notes = []
    for label, summary, _, option in _percentile_checks(report, limits):
        count = summary["count"]
        if count < limits.min_samples:
            notes.append(
                f"{label} p99 not checked against {option}: not enough samples "
                f"({count} < --min-samples {limits.min_samples})"
            )
    return notes


def check_thresholds(report: dict[str, Any], limits: Thresholds) -> list[str]:
    """One human sentence per violated limit; empty when the run passes."""
    violations: list[str] = []
    if report["requests"] == 0:
        violations.append("no request completed")
    stream = report["stream"]
    if stream["attempted"] and not stream["completed"]:
        errors = report["errors_by_request_kind"].get("stream", {})
        why = ", ".join(f"{k} {v}" for k, v in errors.items())
        violations.append(
            f"no stream completed of {stream['attempted']} attempted ({why}); "
            f"check --agent-path {report['config']['agent_path']!r} and --end-event"
        )
    resume = report["resume"]
    if resume["lost_events"] or resume["duplicated_events"]:
        violations.append(
            f"resumed runs lost {resume['lost_events']} and duplicated "
            f"{resume['duplicated_events']} events (runs whose pumping replica lived: must be 0)"
        )
    for label, summary, limit, option in _percentile_checks(report, limits):
        p99 = summary["p99"]
        if summary["count"] >= limits.min_samples and p99 is not None and p99 > limit:
            violations.append(f"{label} p99 {p99:.2f} ms > {option} {limit:g}")
    if limits.max_error_rate is not None and report["requests"]:
        rate = report["error_rate"]
        if rate > limits.max_error_rate:
            violations.append(
                f"error rate {rate:.2%} > --max-error-rate {limits.max_error_rate:.2%}"
                + (" ('none' disables this check)" if rate >= 0.5 else "")
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


def hints(report: dict[str, Any]) -> list[str]:
    """Likely causes of the commonest failed runs, from the errors' kinds."""
    out = []
    by_kind = report["errors_by_request_kind"]
    cfg = report["config"]
    if any("status_404" in by_kind.get(kind, {}) for kind in SESSION_KINDS):
        out.append(
            f"404 on the session API: the gateway has no application {cfg['app']!r} (--app); "
            "without APPS_FILE it has one, 'demo'"
        )
    elif "status_404" in by_kind.get("stream", {}):
        out.append(
            f"404 on streams: the upstream has no path {cfg['agent_path']!r} (--agent-path); "
            "the built-in demo agent and the stub answer 'chat'"
        )
    if "truncated" in by_kind.get("stream", {}) and cfg["end_event"]:
        out.append(
            f"truncated streams: each must end with `event: {cfg['end_event']}` (--end-event; "
            "'' accepts a clean end)"
        )
    return out


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
    for note in report["thresholds"].get("not_checked", []):
        lines.append(f"  note: {note}")
    if violations:
        for hint in hints(report):
            lines.append(f"  hint: {hint}")
        lines.append("  FAILED: " + "; ".join(violations))
    else:
        lines.append("  passed")
    return "\n".join(lines)
