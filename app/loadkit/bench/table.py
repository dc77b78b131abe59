"""The bench's results as the table a person reads (stdout)."""

from __future__ import annotations

from typing import Any


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def format_results(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"agent-bff benchmark, {m['date']} on {m['host']}: {m['cpu']} ({m['cpus']} CPUs), "
        f"Linux {m['kernel']}, Python {m['python']}, aiohttp {m['aiohttp']}, "
        f"redis-py {m['redis_py']}",
        f"  {m['redis_server']}; {m['nginx']}; {m['wrk']}",
        f"  load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')}",
        f"  servers on CPU {results['options']['server_cpu']}, wrk/Redis/kit on CPU "
        f"{results['options']['client_cpu']}; {results['options']['reps']} interleaved "
        f"repetitions of {results['options']['seconds']:g} s, wrk -t1 -c"
        f"{results['options']['connections']} (SSE -c{results['options']['sse_connections']})",
        "",
        f"  {'row':<48}{'req/s median':>13}{'[min - max]':>19}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'redis/req':>10}{'CPU us/req':>11}",
    ]
    for row in results["rows"].values():
        cmds = row["redis_commands_per_request"]
        rng = f"[{row['rps_min']:,.0f} - {row['rps_max']:,.0f}]"
        lines.append(
            f"  {row['label']:<48}{row['rps_median']:>13,.0f}{rng:>19}{row['p50_ms']:>9.2f}"
            f"{row['p99_ms']:>9.2f}{row['errors']:>8}{'-' if cmds is None else f'{cmds:.2f}':>10}"
            f"{_num(row.get('cpu_us_per_request')):>11}"
        )
    ttfe = results.get("ttfe_ms", {})
    if ttfe:
        lines += [
            "",
            "  time to first event (sequential streams, ms): "
            + "; ".join(
                f"{name} median {v['median']:.3f} p90 {v['p90']:.3f}" for name, v in ttfe.items()
            ),
        ]
    fill = results.get("memory_fill")
    if fill:
        lines.append(
            f"  memory store: {fill['sessions_created']} sessions of "
            f"~{fill['value_bytes_approx']} B: "
            f"RSS {fill['rss_before_mb']} -> {fill['rss_after_mb']} MB "
            f"({fill['bytes_per_session']} B/session)"
        )
    steady = results.get("memory_steady")
    if steady:
        lines.append(
            f"  steady mixed run ({steady['run_seconds']:g} s, {steady['run_rps']:.0f} req/s, "
            f"{steady['run_errors']} errors, {steady['run_lost_sessions']} lost): RSS "
            f"{steady['rss_start_mb']} (start) -> {steady['rss_after_warmup_mb']} (warm) -> "
            f"{steady['rss_after_run_mb']} MB"
        )
    for key, prof in results.get("profiles", {}).items():
        lines += [
            "",
            f"  profile of {key}: {prof['samples']} samples, busy {prof['busy_share']:.0%} "
            "(shares of busy samples; inclusive | self)",
        ]
        pairs = zip(prof["inclusive"][:18], prof["self"][:18], strict=False)
        lines += [f"    {a[0]:5.1f}% {a[1]:<58.58} {b[0]:5.1f}% {b[1]}" for a, b in pairs]
    lines += [
        "",
        f"  {'ratio / figure (ratios: median of per-repetition ratios)':<62}{'measured':>10}"
        f"{'[min - max]':>17}{'by CPU':>8}{'target':>10}  verdict",
    ]
    for r in results["ratios"]:
        target = "" if r["op"] == "info" or not r["target"] else f"{r['op']} {r['target']:g}"
        verdict = "" if not target else ("met" if r["met"] else "MISSED")
        spread = f"[{r['min']:.2f} - {r['max']:.2f}]" if "min" in r else ""
        by_cpu = f"{r['by_cpu']:.3f}" if r.get("by_cpu") is not None else ""
        lines.append(
            f"  {r['name']:<62}{r['value']:>10.3f}{spread:>17}{by_cpu:>8}{target:>10}  {verdict}"
        )
    return "\n".join(lines)
