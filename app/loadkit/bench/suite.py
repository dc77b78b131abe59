"""The whole bench run and its command line (`agent-bff-bench`, scripts/bench.py)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from app.loadkit.bench.lab import (
    RESUMABLE_APP,
    UNREACHED_LIMITS,
    Lab,
    create_sessions,
    raw_sessions,
)
from app.loadkit.bench.options import AGENT_PATH, Options
from app.loadkit.bench.probes import memory_fill, mixed_run, resumable_memory, ttfe_samples
from app.loadkit.bench.ratios import ratios
from app.loadkit.bench.rows import RowResult, all_rows, profile_rows, run_row
from app.loadkit.bench.table import format_results
from app.loadkit.wrk import write_script, wrk_binary


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "-"
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[0] if text else "-"

    import aiohttp as aiohttp_module
    import redis as redis_module

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "host": platform.node(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp_module.__version__,
        "redis_py": redis_module.__version__,
        "redis_server": version(["redis-server", "--version"]),
        "nginx": version(["nginx", "-v"]),
        "wrk": version([wrk_binary(), "-v"]),
        # Other work on the machine skews single figures (ratios hold better): say so.
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def run(options: Options, *, log: Callable[[str], None]) -> dict[str, Any]:
    """The whole suite; returns the results (also what `--json` writes)."""
    cpus = os.cpu_count() or 1
    if cpus < 2:
        log("bench: fewer than 2 CPUs: no pinning, figures are not comparable to the targets")
        options = replace(options, server_cpu=None, client_cpu=None)
    if options.client_cpu is not None:
        os.sched_setaffinity(0, {options.client_cpu})
    wrk_binary()
    tmp = Path(tempfile.mkdtemp(prefix="agent-bff-bench-"))
    lab = Lab(options, tmp)
    results: dict[str, Any] = {"machine": machine(), "options": asdict(options)}
    try:
        log("bench: starting redis, the stub, gateways, peers, nginx ...")
        lab.start_redis()
        lab.start_stub()
        lab.start_gateway("gw_redis", "redis", wait=False)
        lab.start_gateway("gw_mem", "memory", wait=False)
        if options.log_level_row:
            lab.start_gateway("gw_redis_quiet", "redis", wait=False, LOG_LEVEL="warning")
        if options.cost_rows:
            key = base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")
            lab.start_gateway("gw_redis_enc", "redis", wait=False, SESSION_ENCRYPTION_KEYS=key)
            lab.start_gateway("gw_redis_limited", "redis", wait=False, app_extra=UNREACHED_LIMITS)
            lab.start_gateway("gw_mem_public", "memory", wait=False, FAST_PATHS="off")
            lab.start_gateway("gw_redis_public", "redis", wait=False, FAST_PATHS="off")
        # Resumable runs (app/runs/): a short window, so ended runs leave Redis within seconds.
        lab.start_gateway("gw_redis_resumable", "redis", wait=False, app_extra=RESUMABLE_APP)
        lab.start_peer("stock", "stock")
        lab.start_peer("nosession", "nosession")
        lab.start_peer("rawget", "rawget")
        has_nginx = lab.start_nginx()
        lab.wait_all()
        if not has_nginx:
            log("bench: nginx not installed: its SSE row is skipped")
        for name in (
            "gw_redis",
            "gw_redis_resumable",
            "gw_mem",
            "stock",
            "gw_redis_quiet",
            "gw_redis_enc",
            "gw_redis_limited",
            "gw_mem_public",
            "gw_redis_public",
        ):
            if name in lab.urls:
                lines = asyncio.run(create_sessions(lab.urls[name], options.sessions))
                lab.cookies[name] = tmp / f"{name}.cookies"
                lab.cookies[name].write_text("\n".join(lines) + "\n")
        lab.cookies["rawget"] = tmp / "rawget.cookies"
        lab.cookies["rawget"].write_text("\n".join(raw_sessions(lab, options.sessions)) + "\n")
        script = write_script(tmp)
        rows = all_rows(options, has_nginx)
        row_results = {row.key: RowResult(row) for row in rows}
        if options.warmup > 0:
            log(f"bench: warm-up, {options.warmup:g} s per row")
            for row in rows:
                run_row(lab, row, script, options.warmup, None)
        for rep in range(options.reps):
            for row in rows:
                run_row(lab, row, script, options.seconds, row_results[row.key])
                last = row_results[row.key].runs[-1]
                log(
                    f"bench: rep {rep + 1}/{options.reps} {row.key:<20} {last.rps:>9.0f} req/s "
                    f"p99 {last.p99_ms:.2f} ms errors {last.errors}"
                )
        results["rows"] = {key: r.summary() for key, r in row_results.items()}
        if options.profile:
            results["profiles"] = profile_rows(lab, rows, script, options.profile, log)
        targets = {
            "direct": (lab.urls["stub"] + "/base/stream", None),
            "gateway": (
                lab.urls["gw_redis"] + AGENT_PATH,
                lab.cookies["gw_redis"].read_text().splitlines()[0],
            ),
        }
        if has_nginx:
            targets["nginx"] = (lab.urls["nginx"] + AGENT_PATH, None)
        log(f"bench: time to first event, {options.ttfe_streams} sequential streams per target")
        samples = asyncio.run(ttfe_samples(targets, options.ttfe_streams))
        results["ttfe_ms"] = {
            name: {
                "median": round(statistics.median(v), 3),
                "p90": round(sorted(v)[int(0.9 * (len(v) - 1))], 3),
                "min": round(min(v), 3),
                "count": len(v),
            }
            for name, v in samples.items()
        }
        log(f"bench: Redis memory of {options.active_runs} active resumable runs")
        results["resumable_memory"] = asyncio.run(resumable_memory(lab, options.active_runs))
        log(f"bench: memory store filled with {options.memory_sessions} sessions")
        results["memory_fill"] = memory_fill(lab, script)
        log(f"bench: mixed run with the kit, {options.mixed_seconds:g} s")
        results["memory_steady"] = mixed_run(lab)
    finally:
        lab.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["ratios"] = ratios(results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="The benchmark suite: the gateway beside its peers, in one run, as ratios."
    )
    parser.add_argument("--smoke", action="store_true", help="every row once, briefly")
    parser.add_argument("--reps", type=int, help="interleaved repetitions (3)")
    parser.add_argument("--seconds", type=float, help="seconds per measured run (8)")
    parser.add_argument("--connections", type=int, help="wrk connections for session rows (64)")
    parser.add_argument("--ttfe-streams", type=int, help="sequential streams per TTFE target")
    parser.add_argument("--rows", default="", help="comma-separated row keys (default: all)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write results as JSON")
    parser.add_argument(
        "--profile",
        default="",
        metavar="ROWS",
        help="comma-separated row keys to sample with py-spy in an extra run (needs py-spy)",
    )
    args = parser.parse_args(argv)
    options = Options.smoke() if args.smoke else Options()
    overrides: dict[str, Any] = {}
    if args.reps:
        overrides["reps"] = args.reps
    if args.seconds:
        overrides["seconds"] = args.seconds
    if args.connections:
        overrides["connections"] = args.connections
    if args.ttfe_streams:
        overrides["ttfe_streams"] = args.ttfe_streams
    if args.profile:
        overrides["profile"] = tuple(r.strip() for r in args.profile.split(",") if r.strip())
    if args.rows:
        overrides["rows"] = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    if overrides:
        options = replace(options, **overrides)
    try:
        results = run(options, log=lambda line: print(line, file=sys.stderr, flush=True))
    except RuntimeError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 1
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
