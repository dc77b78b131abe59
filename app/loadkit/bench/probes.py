"""The bench's measurements beside the wrk rows: time to first event, memory-store RSS filled and
after a mixed run of the kit, and Redis memory per resumable run."""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from app.loadkit.bench.lab import Lab
from app.loadkit.bench.options import SESSION_PATH
from app.loadkit.sse import SSEParser
from app.loadkit.wrk import run_wrk


async def ttfe_samples(
    targets: dict[str, tuple[str, str | None]], count: int
) -> dict[str, list[float]]:
    """Sequential streams, one connection per target, interleaved: first-event times (ms)."""
    out: dict[str, list[float]] = {name: [] for name in targets}
    sessions = {
        name: aiohttp.ClientSession(
            headers={"Cookie": cookie} if cookie else None,
            cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=1),
        )
        for name, (_, cookie) in targets.items()
    }
    headers = {"X-CSRF": "1", "Content-Type": "application/json", "Accept": "text/event-stream"}
    try:
        for i in range(count + 3):  # the first 3 warm the connections up
            for name, (url, _) in targets.items():
                parser = SSEParser()
                first: float | None = None
                t0 = time.perf_counter()
                async with sessions[name].post(url, data=b'{"input":"hi"}', headers=headers) as r:
                    if r.status != 200:
                        raise RuntimeError(f"TTFE {name}: HTTP {r.status}")
                    async for chunk in r.content.iter_any():
                        if first is None and parser.feed(chunk):
                            first = time.perf_counter() - t0
                if first is not None and i >= 3:
                    out[name].append(first * 1000)
    finally:
        for http in sessions.values():
            await http.close()
    return out


def memory_fill(lab: Lab, script: Path) -> dict[str, Any]:
    """RSS of a fresh memory-store gateway before and after `memory_sessions` sessions."""
    o = lab.options
    lab.start_gateway("gw_mem_fill", "memory", LOG_LEVEL="warning")
    proc = lab.procs["gw_mem_fill"]
    time.sleep(0.5)
    before = proc.rss_mb()
    res = run_wrk(
        lab.urls["gw_mem_fill"] + SESSION_PATH,
        script=script,
        method="PATCH",
        connections=o.connections,
        # wrk runs for its whole duration even once its threads stopped at `max_requests`:
        # about 1,000 sessions a second, at least 3 s (the smoke's 2,000: 3 s, not 10).
        seconds=max(3.0, o.memory_sessions / 1000),
        max_requests=o.memory_sessions,
        cpu=o.client_cpu,
    )
    time.sleep(0.5)
    after = proc.rss_mb()
    proc.stop()
    created = res.requests - res.errors
    return {
        "sessions_created": created,
        "value_bytes_approx": len(
            json.dumps(
                {
                    "v": 1,
                    "r": 1,
                    "created": 1764000000,
                    "data": {"p": "x" * 180, "n": 12345},
                    "gw": {"created_at": 1764000000},
                }
            )
        ),
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "bytes_per_session": round((after - before) * 1024 * 1024 / created) if created else None,
        "errors": res.errors,
    }


def mixed_run(lab: Lab) -> dict[str, Any]:
    """RSS of a memory-store gateway after a warm-up and after a steady mixed run (the kit)."""
    o = lab.options
    lab.start_gateway("gw_mem_steady", "memory", LOG_LEVEL="warning")
    proc = lab.procs["gw_mem_steady"]
    url = lab.urls["gw_mem_steady"]

    def kit(seconds: float) -> dict[str, Any]:
        command = [
            sys.executable,
            "-m",
            "app.loadkit.loadgen",
            "--url",
            url,
            "-c",
            str(o.mixed_users),
            "-d",
            str(seconds),
            "--json",
            "--no-progress",
            "-q",
            "--think-ms",
            "2",
        ]
        if o.client_cpu is not None and shutil.which("taskset"):
            command = ["taskset", "-c", str(o.client_cpu), *command]
        done = subprocess.run(command, capture_output=True, timeout=seconds + 60, check=False)
        try:
            report: dict[str, Any] = json.loads(done.stdout)
        except ValueError as err:
            raise RuntimeError(f"loadgen failed: {done.stderr.decode()[-2000:]}") from err
        return report

    start = proc.rss_mb()
    warm = kit(o.mixed_warmup)
    before = proc.rss_mb()
    steady = kit(o.mixed_seconds)
    after = proc.rss_mb()
    proc.stop()
    return {
        "rss_start_mb": round(start, 1),
        "rss_after_warmup_mb": round(before, 1),
        "rss_after_run_mb": round(after, 1),
        "growth_mb": round(after - before, 1),
        "warmup_requests": warm["requests"],
        "run_requests": steady["requests"],
        "run_rps": steady["rps"],
        "run_errors": steady["errors"],
        "run_lost_sessions": steady["sessions"]["lost"] + steady["sessions"]["stale"],
        "run_seconds": o.mixed_seconds,
    }


async def resumable_memory(lab: Lab, count: int) -> dict[str, Any]:
    """Redis `used_memory` after `count` resumable runs of 50 events of 200 B (each in its own
    session), measured inside their window, minus before: bytes one run keeps in Redis; and
    `MEMORY USAGE` of one run's keys. (A run still pumping also has its heartbeat key.)"""
    client = lab.redis()
    url = lab.urls["gw_redis_resumable"] + "/apps/demo/agent/stream?events=50&size=200"
    headers = {"X-CSRF": "1", "Content-Type": "application/json", "Accept": "text/event-stream"}
    await asyncio.sleep(3.0)  # runs of the SSE rows leave Redis (their window is 2 s)
    before = int(client.info("memory")["used_memory"])

    async def one() -> bool:
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
            http.post(url, data=b"{}", headers=headers) as response,
        ):
            body = await response.read()
            return "X-Run-Id" in response.headers and body.count(b"\n\n") == 51

    started = time.monotonic()
    results: list[bool | BaseException] = []
    # In batches under the per-client cap (max_concurrent_per_client, 64 by default).
    for start in range(0, count, 50):
        batch = range(start, min(start + 50, count))
        results += await asyncio.gather(*(one() for _ in batch), return_exceptions=True)
    took = time.monotonic() - started
    complete = sum(1 for r in results if r is True)
    during = int(client.info("memory")["used_memory"])
    keys = list(client.scan_iter(match="agent:aux:run:*:e", count=1000))
    # MEMORY USAGE of each run's keys (stream, meta, readers), averaged over up to 50 runs.
    totals: list[int] = []
    per_key: dict[str, int | None] = {}
    for key in keys[:50]:
        base = key.decode().removesuffix(":e")
        sizes = {kind: client.memory_usage(f"{base}:{kind}") for kind in ("e", "m", "r")}
        per_key = per_key or sizes
        totals.append(sum(v or 0 for v in sizes.values()))
    client.close()
    return {
        "runs": count,
        "complete": complete,
        "stream_keys": len(keys),
        "seconds": round(took, 2),
        "used_memory_before": before,
        "used_memory_after": during,
        "bytes_per_run": round(statistics.mean(totals)) if totals else None,
        # used_memory growth per run: includes each run's new session, allocator overhead.
        "used_memory_per_run": round((during - before) / len(keys)) if keys and took < 2 else None,
        "memory_usage_of_one_run": per_key,
    }
