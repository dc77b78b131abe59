"""The bench's rows: what each measures (server, path, method, cookies), one wrk run of a row with
the server CPU and Redis commands it cost, and the optional py-spy profile of a row."""

from __future__ import annotations

import re
import statistics
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from app.loadkit import profiles
from app.loadkit.bench.lab import Lab
from app.loadkit.bench.options import AGENT_PATH, SESSION_PATH, Options
from app.loadkit.wrk import WrkResult, run_wrk

# Commands that observe or keep connections alive, not session work.
_OVERHEAD_COMMANDS = frozenset(
    {
        "info",
        "config",
        "config|resetstat",
        "config|get",
        "ping",
        "client",
        "client|setname",
        "client|setinfo",
        "hello",
        "select",
    }
)


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    label: str
    server: str  # a key of Lab.urls
    path: str
    method: str = "GET"
    cookies: str | None = None  # a key of Lab.cookies
    redis: bool = False
    sse: bool = False


def all_rows(options: Options, has_nginx: bool) -> list[Row]:
    rows = [
        Row(
            "gw_redis_read",
            "gateway, Redis store: read",
            "gw_redis",
            SESSION_PATH,
            cookies="gw_redis",
            redis=True,
        ),
        Row(
            "gw_redis_write",
            "gateway, Redis store: write (PATCH)",
            "gw_redis",
            SESSION_PATH,
            "PATCH",
            cookies="gw_redis",
            redis=True,
        ),
        Row("gw_mem_read", "gateway, memory store: read", "gw_mem", SESSION_PATH, cookies="gw_mem"),
        Row(
            "gw_mem_write",
            "gateway, memory store: write (PATCH)",
            "gw_mem",
            SESSION_PATH,
            "PATCH",
            cookies="gw_mem",
        ),
        Row(
            "stock_read",
            "stock aiohttp-session RedisStorage: read",
            "stock",
            SESSION_PATH,
            cookies="stock",
            redis=True,
        ),
        Row(
            "stock_write",
            "stock aiohttp-session RedisStorage: write",
            "stock",
            SESSION_PATH,
            "PATCH",
            cookies="stock",
            redis=True,
        ),
        Row("nosession", "aiohttp handler, no session (ceiling)", "nosession", SESSION_PATH),
        Row(
            "rawget",
            "aiohttp + one redis-py GET (ceiling)",
            "rawget",
            SESSION_PATH,
            cookies="rawget",
            redis=True,
        ),
        Row(
            "sse_direct",
            "SSE 50x200 B: direct to the stub",
            "stub",
            "/base/stream",
            "POST",
            sse=True,
        ),
        Row(
            "sse_gateway",
            "SSE 50x200 B: via gateway (Redis session)",
            "gw_redis",
            AGENT_PATH,
            "POST",
            cookies="gw_redis",
            redis=True,
            sse=True,
        ),
        Row(
            "sse_gateway_resumable",
            "SSE 50x200 B: via gateway, resumable runs (Redis)",
            "gw_redis_resumable",
            AGENT_PATH,
            "POST",
            cookies="gw_redis_resumable",
            redis=True,
            sse=True,
        ),
    ]
    if has_nginx:
        rows.append(
            Row(
                "sse_nginx",
                "SSE 50x200 B: via nginx (proxy_buffering off)",
                "nginx",
                AGENT_PATH,
                "POST",
                sse=True,
            )
        )
    if options.cost_rows:
        rows += cost_rows()
    if options.log_level_row:
        rows.insert(
            1,
            Row(
                "gw_redis_read_quiet",
                "gateway, Redis store: read, LOG_LEVEL=warning",
                "gw_redis_quiet",
                SESSION_PATH,
                cookies="gw_redis_quiet",
                redis=True,
            ),
        )
    if options.rows:
        rows = [r for r in rows if r.key in options.rows]
    return rows


def cost_rows() -> list[Row]:
    """What encryption and rate limits add to the default configuration's rows."""
    return [
        Row(
            "gw_redis_read_enc",
            "gateway, Redis store: read, encrypted (SESSION_ENCRYPTION_KEYS)",
            "gw_redis_enc",
            SESSION_PATH,
            cookies="gw_redis_enc",
            redis=True,
        ),
        Row(
            "gw_redis_write_enc",
            "gateway, Redis store: write, encrypted",
            "gw_redis_enc",
            SESSION_PATH,
            "PATCH",
            cookies="gw_redis_enc",
            redis=True,
        ),
        # The public-API paths instead of the fenced fast ones (app/fast_metrics.py, the access
        # log's own formatting in app/access_log.py): what those fast paths save.
        Row(
            "gw_mem_read_public",
            "gateway, memory store: read, FAST_PATHS=off",
            "gw_mem_public",
            SESSION_PATH,
            cookies="gw_mem_public",
        ),
        Row(
            "gw_redis_read_public",
            "gateway, Redis store: read, FAST_PATHS=off",
            "gw_redis_public",
            SESSION_PATH,
            cookies="gw_redis_public",
            redis=True,
        ),
        Row(
            "sse_gateway_limited",
            "SSE 50x200 B: via gateway, with per-session and per-app rate limits",
            "gw_redis_limited",
            AGENT_PATH,
            "POST",
            cookies="gw_redis_limited",
            redis=True,
            sse=True,
        ),
    ]


@dataclass
class RowResult:
    row: Row
    runs: list[WrkResult] = field(default_factory=list)
    redis_commands: list[float] = field(default_factory=list)
    commands: dict[str, float] = field(default_factory=dict)
    cpu_us: list[float] = field(default_factory=list)  # server CPU per request, per run
    # The row's own server only (without the stub behind a proxy), per request, per run.
    own_cpu_us: list[float] = field(default_factory=list)
    # A gateway's run counters (`run_counts`) over the row's runs, summed.
    run_counts: dict[str, float] = field(default_factory=dict)

    def median(self, get: Callable[[WrkResult], float]) -> float:
        return statistics.median(get(r) for r in self.runs) if self.runs else 0.0

    def summary(self) -> dict[str, Any]:
        rps = [r.rps for r in self.runs]
        return {
            "label": self.row.label,
            "rps_median": round(statistics.median(rps), 1) if rps else None,
            "rps_min": round(min(rps), 1) if rps else None,
            "rps_max": round(max(rps), 1) if rps else None,
            "p50_ms": round(self.median(lambda r: r.p50_ms), 3),
            "p99_ms": round(self.median(lambda r: r.p99_ms), 3),
            "p99_ms_max": round(max((r.p99_ms for r in self.runs), default=0.0), 3),
            "errors": sum(r.errors for r in self.runs),
            "requests": sum(r.requests for r in self.runs),
            "redis_commands_per_request": round(statistics.median(self.redis_commands), 3)
            if self.redis_commands
            else None,
            "redis_commands_by_name": self.commands,
            "run_counts": self.run_counts,
            "cpu_us_per_request": round(statistics.median(self.cpu_us), 1) if self.cpu_us else None,
            "cpu_us_runs": [round(x, 1) for x in self.cpu_us],
            "own_cpu_us_per_request": round(statistics.median(self.own_cpu_us), 1)
            if self.own_cpu_us
            else None,
            "runs": [r.as_dict() for r in self.runs],
        }


def session_commands(client: redis.Redis) -> dict[str, int]:
    info: dict[str, Any] = client.info("commandstats")
    calls: dict[str, int] = {}
    for name, stats in info.items():
        command = name.removeprefix("cmdstat_").lower()
        if command not in _OVERHEAD_COMMANDS and isinstance(stats, dict):
            calls[command] = int(stats["calls"])
    return calls


_RUN_COUNTER = re.compile(r"^agent_bff_runs_(\w+)_total (\S+)$", re.MULTILINE)


def run_counts(url: str) -> dict[str, float]:
    """A gateway's run counters from its `/metrics` (`agent_bff_runs_<name>_total`: started,
    unresumable, created_ended ...), by name; {} when it has none."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as reply:  # noqa: S310 (loopback)
        text = reply.read().decode()
    return {name: float(value) for name, value in _RUN_COUNTER.findall(text)}


def run_row(lab: Lab, row: Row, script: Path, seconds: float, result: RowResult | None) -> None:
    o = lab.options
    gateway = row.server.startswith("gw")
    counts_before = run_counts(lab.urls[row.server]) if gateway else {}
    client = lab.redis() if row.redis else None
    if client is not None:
        client.config_resetstat()
    # Every process on the server CPU that works for this row: the server, and the stub
    # behind a proxy in the SSE rows.
    servers = [lab.procs[row.server]] if row.server in lab.procs else []
    if row.sse and row.server != "stub":
        servers.append(lab.procs["stub"])
    cpu_before = sum(p.cpu_seconds() for p in servers)
    own_before = servers[0].cpu_seconds() if servers else 0.0
    res = run_wrk(
        lab.urls[row.server] + row.path,
        script=script,
        method=row.method,
        cookie_file=lab.cookies.get(row.cookies) if row.cookies else None,
        connections=o.sse_connections if row.sse else o.connections,
        seconds=seconds,
        cpu=o.client_cpu,
    )
    cpu_used = sum(p.cpu_seconds() for p in servers) - cpu_before
    own_used = (servers[0].cpu_seconds() if servers else 0.0) - own_before
    if result is not None and res.requests:
        result.cpu_us.append(cpu_used * 1e6 / res.requests)
        result.own_cpu_us.append(own_used * 1e6 / res.requests)
    if client is not None:
        calls = session_commands(client)
        client.close()
        if result is not None and res.requests:
            result.redis_commands.append(sum(calls.values()) / res.requests)
            result.commands = {k: round(v / res.requests, 3) for k, v in sorted(calls.items())}
    if result is not None:
        result.runs.append(res)
        if gateway:
            for name, value in run_counts(lab.urls[row.server]).items():
                change = value - counts_before.get(name, 0.0)
                result.run_counts[name] = result.run_counts.get(name, 0.0) + change


def profile_rows(
    lab: Lab, rows: list[Row], script: Path, keys: Sequence[str], log: Callable[[str], None]
) -> dict[str, Any]:
    """An extra, unmeasured run of each row in `keys` while py-spy samples its server."""
    out: dict[str, Any] = {}
    if profiles.py_spy() is None:
        log("bench: --profile needs py-spy (pip install py-spy): skipped")
        return out
    for row in rows:
        if row.key not in keys:
            continue
        proc = lab.procs.get(row.server)
        if proc is None:
            continue
        raw = lab.tmp / f"profile-{row.key}.raw"
        seconds = max(4.0, lab.options.seconds)
        sampler = profiles.record(proc.pid, seconds - 1, raw)
        run_row(lab, row, script, seconds, None)
        sampler.wait(timeout=60)
        if raw.exists():
            out[row.key] = profiles.fold(raw)
            log(f"bench: profiled {row.key} ({out[row.key]['samples']} samples)")
    return out
