#!/usr/bin/env python3
"""A session-creation flood against a fresh `python -m app` (memory store), with its RSS.

    .venv/bin/python scripts/session_flood.py                      # 20,000 x 64 KB, defaults
    .venv/bin/python scripts/session_flood.py --count 5000 --env MEMORY_MAX_BYTES=67108864

Starts the gateway on a free loopback port (memory store, the given `--env` on top of the
defaults, `SESSION_CREATE_RATE=off` unless given: the flood comes from loopback, which the
creation limit does not count anyway), sends `--count` cookieless `PATCH /apps/demo/session`
of about `--size` bytes each (`--concurrency` at a time), samples the process's RSS, prints one
line per sample and a summary, then stops the gateway (SIGTERM, by its PID). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

from app.loadkit.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def start_gateway(env_pairs: list[str], workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "VIRTUAL_ENV")}
    env.update(
        PYTHONPATH=str(ROOT),
        HOST="127.0.0.1",
        PORT=str(port),
        SESSION_STORE="memory",
        SESSION_CREATE_RATE="off",
        LOG_LEVEL="warning",
    )
    for pair in env_pairs:
        name, _, value = pair.partition("=")
        env[name] = value
    proc = subprocess.Popen(
        [sys.executable, "-m", "app"], env=env, cwd=workdir, stdout=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1):  # noqa: S310 (http://)
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the gateway exited with {proc.returncode}") from None
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the gateway did not become healthy")


async def flood(url: str, count: int, size: int, concurrency: int, pid: int) -> dict[int, int]:
    body = ('{"pad": "' + "x" * max(size - 12, 0) + '"}').encode()
    statuses: dict[int, int] = {}
    sent = 0
    next_sample = time.monotonic()
    started = next_sample
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:

        async def worker() -> None:
            nonlocal sent, next_sample
            while sent < count:
                sent += 1
                async with http.patch(
                    f"{url}/apps/demo/session",
                    data=body,
                    headers={"X-CSRF": "1", "Content-Type": "application/json"},
                ) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                now = time.monotonic()
                if now >= next_sample:
                    next_sample = now + 1.0
                    rss = rss_bytes(pid) / MIB
                    print(f"{now - started:6.1f}s  sent {sent:6d}  RSS {rss:7.1f} MiB", flush=True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=65_000, help="bytes per PATCH body")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--env", action="append", default=[], help="NAME=value for the gateway")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="session-flood-") as workdir:
        proc, url = start_gateway(args.env, workdir)
        try:
            baseline = rss_bytes(proc.pid)
            started = time.monotonic()
            statuses = asyncio.run(flood(url, args.count, args.size, args.concurrency, proc.pid))
            elapsed = time.monotonic() - started
            final = rss_bytes(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"{args.count} PATCHes of {args.size} bytes in {elapsed:.1f}s: statuses {statuses}")
    print(
        f"RSS {baseline / MIB:.1f} MiB -> {final / MIB:.1f} MiB (+{(final - baseline) / MIB:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
