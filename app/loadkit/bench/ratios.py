"""The ratios and figures the project targets, computed from a run's results, each with its
target and verdict."""

from __future__ import annotations

import statistics
from typing import Any


def _cpu_ratio(results: dict[str, Any], cheap: str, costly: str) -> float | None:
    a, b = results["rows"].get(cheap), results["rows"].get(costly)
    if not a or not b or not a.get("cpu_us_per_request") or not b.get("cpu_us_per_request"):
        return None
    return round(float(a["cpu_us_per_request"]) / float(b["cpu_us_per_request"]), 3)


def _paired_ratios(results: dict[str, Any], num: str, den: str) -> list[float]:
    a, b = results["rows"].get(num), results["rows"].get(den)
    if a is None or b is None:
        return []
    return [x["rps"] / y["rps"] for x, y in zip(a["runs"], b["runs"], strict=False) if y["rps"]]


# Throughput ratios (name, row, baseline row, target: the row's rps over the baseline's at
# least this; 0.0: for information).
_TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("gateway Redis read / stock RedisStorage read", "gw_redis_read", "stock_read", 2.0),
    ("gateway Redis write / stock RedisStorage write", "gw_redis_write", "stock_write", 1.5),
    ("gateway memory read / no-session handler", "gw_mem_read", "nosession", 0.85),
    ("gateway memory write / no-session handler", "gw_mem_write", "nosession", 0.85),
    ("(ceiling) one redis-py GET / no-session handler", "rawget", "nosession", 0.0),
    ("(peer) stock RedisStorage read / one redis-py GET", "stock_read", "rawget", 0.0),
    ("gateway Redis read / one redis-py GET", "gw_redis_read", "rawget", 0.0),
)
# What the optional features cost (name, row, baseline row), for information: the targets
# are for the default configuration.
_COSTS: tuple[tuple[str, str, str], ...] = (
    ("(cost) encrypted Redis read / plain Redis read", "gw_redis_read_enc", "gw_redis_read"),
    ("(cost) encrypted Redis write / plain", "gw_redis_write_enc", "gw_redis_write"),
    ("(cost) SSE with rate limits / without", "sse_gateway_limited", "sse_gateway"),
    ("(cost) memory read, FAST_PATHS=off / auto", "gw_mem_read_public", "gw_mem_read"),
    ("(cost) Redis read, FAST_PATHS=off / auto", "gw_redis_read_public", "gw_redis_read"),
)


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue: measured value, target, verdict."""
    out: list[dict[str, Any]] = []

    def ratio(name: str, num: str, den: str, target: float, *, higher: bool = True) -> None:
        per_rep = _paired_ratios(results, num, den)
        if not per_rep:
            return
        # The median of per-repetition ratios: the two rows of one repetition ran minutes
        # apart at most, so drift and other work on the machine cancel out better than in a
        # ratio of medians.
        value = statistics.median(per_rep)
        met = value >= target if higher else value <= target
        cpu_a = results["rows"][num].get("cpu_us_per_request")
        cpu_b = results["rows"][den].get("cpu_us_per_request")
        out.append(
            {
                "name": name,
                # Throughput per CPU-second of the server: robust to other work on the box.
                "by_cpu": round(cpu_b / cpu_a, 3) if cpu_a and cpu_b else None,
                "value": round(value, 3),
                "min": round(min(per_rep), 3),
                "max": round(max(per_rep), 3),
                "target": target,
                "op": ">=" if higher else "<=",
                "met": met,
            }
        )

    for name, num, den, target in _TARGETS:
        ratio(name, num, den, target)
    for name, num, den in _COSTS:
        ratio(name, num, den, 0.0)
    plain, resumable = rows_of(results, "sse_gateway"), rows_of(results, "sse_gateway_resumable")
    if plain and resumable and plain["own_cpu_us_per_request"]:
        value = resumable["own_cpu_us_per_request"] / plain["own_cpu_us_per_request"]
        # The gateway's own counters: a stream relayed without resume (over the budget, Redis
        # failing) is not a run. (Streams cut at the end of a repetition started runs that
        # wrk does not count as requests: the share may be a little over 1.)
        counts, requests = resumable.get("run_counts", {}), resumable.get("requests") or 0
        share = counts["started"] / requests if "started" in counts and requests else None
        runs_only = share is not None and share >= 0.99 and not counts.get("unresumable")
        out.append(
            {
                "name": "gateway CPU per stream: resumable run (Redis) / plain relay",
                "value": round(value, 3),
                "target": 1.3,
                "op": "<=",
                "met": value <= 1.3 and runs_only,
            }
        )
        out.append(
            {
                "name": "share of the resumable row's streams that were runs (must be 1)",
                "value": round(share or 0.0, 3),
                "target": 0.99,
                "op": ">=",
                "met": runs_only,
            }
        )
    memory = results.get("resumable_memory")
    if memory and memory.get("bytes_per_run") is not None:
        out.append(
            {
                "name": "Redis memory per resumable run (KB; 50 events of 200 B, in its window)",
                "value": round(memory["bytes_per_run"] / 1024, 1),
                "target": 0.0,
                "op": "info",
                "met": True,
            }
        )
    rows = results["rows"]
    for kind in ("read", "write"):
        gw, stock = rows.get(f"gw_redis_{kind}"), rows.get(f"stock_{kind}")
        if gw and stock and stock["p99_ms"]:
            value = gw["p99_ms"] / stock["p99_ms"]
            out.append(
                {
                    "name": f"gateway Redis {kind} p99 / stock p99",
                    "value": round(value, 3),
                    "target": 1.0,
                    "op": "<=",
                    "met": value <= 1.0,
                }
            )
    gw_direct = _paired_ratios(results, "sse_gateway", "sse_direct")
    nginx_direct = _paired_ratios(results, "sse_nginx", "sse_direct")
    if gw_direct:
        value = statistics.median(gw_direct)
        target = statistics.median(nginx_direct) if nginx_direct else 0.0
        out.append(
            {
                "name": "SSE streams/s: gateway / direct (target: nginx / direct)",
                "by_cpu": _cpu_ratio(results, "sse_direct", "sse_gateway"),
                "value": round(value, 3),
                "min": round(min(gw_direct), 3),
                "max": round(max(gw_direct), 3),
                "target": round(target, 3),
                "op": ">=",
                "met": value >= target,
            }
        )
    ttfe = results.get("ttfe_ms", {})
    if "direct" in ttfe and "gateway" in ttfe:
        added = ttfe["gateway"]["median"] - ttfe["direct"]["median"]
        name = "added time to first event, gateway (median, ms)"
        out.append(
            {"name": name, "value": round(added, 3), "target": 0.5, "op": "<=", "met": added <= 0.5}
        )
        if "nginx" in ttfe:
            added_nginx = ttfe["nginx"]["median"] - ttfe["direct"]["median"]
            name = "(peer) added time to first event, nginx (median, ms)"
            out.append(
                {
                    "name": name,
                    "value": round(added_nginx, 3),
                    "target": 0.0,
                    "op": "info",
                    "met": True,
                }
            )
    fill = results.get("memory_fill")
    if fill:
        scale = 100_000 / max(fill["sessions_created"], 1)
        projected = fill["rss_before_mb"] + (fill["rss_after_mb"] - fill["rss_before_mb"]) * scale
        out.append(
            {
                "name": "memory store RSS with 100k sessions (MB, projected if fewer)",
                "value": round(projected, 1),
                "target": 100.0,
                "op": "<=",
                "met": projected <= 100.0,
            }
        )
    steady = results.get("memory_steady")
    if steady:
        growth = steady["growth_mb"]
        out.append(
            {
                "name": "RSS growth over the steady mixed run (MB)",
                "value": growth,
                "target": 5.0,
                "op": "<=",
                "met": growth <= 5.0,
            }
        )
    return out


def rows_of(results: dict[str, Any], key: str) -> dict[str, Any] | None:
    row: dict[str, Any] | None = results["rows"].get(key)
    return row
