#!/usr/bin/env python3
"""What `SESSION_ENCRYPTION_KEYS` costs: per operation (the codec alone) and per request
(two real gateways on one private redis-server, one with a key, one without, under wrk).

    .venv/bin/python scripts/session_crypto_cost.py [--seconds 5] [--connections 32] [--reps 3]

Prints microseconds per encode/decode for small and large sessions, then requests/s, median
latency and the gateway process's CPU time per request (the steadiest number on a small
machine, where wrk and the gateway share cores) for reads (GET: one GETEX + decrypt) and
writes (PATCH of a changing value: GETEX + decrypt + encrypt + one EVALSHA), with and without
encryption, the runs interleaved.
Needs `redis-server` and `wrk` (scripts/system-deps installs both).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from pathlib import Path

from cryptography.fernet import Fernet

from app.loadkit.ports import free_port
from app.sessions.codec import SessionCodec

REPO_ROOT = Path(__file__).resolve().parent.parent

PATCH_LUA = """
counter = 0
request = function()
  counter = counter + 1
  local body = '{"n":' .. counter .. ',"pad":"' .. string.rep("x", 100) .. '"}'
  return wrk.format("PATCH", nil, {["Content-Type"] = "application/json", ["X-CSRF"] = "1"}, body)
end
"""


def codec_costs(iterations: int) -> None:
    key = Fernet.generate_key().decode()
    plain, encrypted = SessionCodec(max_bytes=1 << 20), SessionCodec([key], max_bytes=1 << 20)
    print("codec, microseconds per operation (median of 5)")
    print(f"{'session':>10} {'mode':>10} {'encode':>9} {'decode':>9} {'stored B':>9}")
    created_at = int(time.time())
    meta = {"conversation_id": "c" * 32}
    for label, data in (
        ("150 B", {"user": 1, "pad": "x" * 120}),
        ("4 KB", {"pad": "x" * 4000}),
        ("60 KB", {"pad": "x" * 60000}),
    ):
        for mode, codec in (("plain", plain), ("encrypted", encrypted)):
            raw = codec.encode(data, 7, "demo:sid", created_at=created_at, meta=meta)
            enc = min_median(
                lambda c=codec, m=data: c.encode(
                    m, 7, "demo:sid", created_at=created_at, meta=meta
                ),
                iterations,
            )
            dec = min_median(lambda c=codec, r=raw: c.decode(r, "demo:sid"), iterations)
            print(f"{label:>10} {mode:>10} {enc:9.1f} {dec:9.1f} {len(raw):9d}")


def min_median(func: object, iterations: int) -> float:
    timer = timeit.Timer(func)  # type: ignore[arg-type]
    runs = [timer.timeit(iterations) / iterations * 1e6 for _ in range(5)]
    return statistics.median(runs)


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="crypto-cost-"))

    def start(self, args: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.tmp / f"p{len(self.procs)}.log").open("wb")
        self.procs.append(
            subprocess.Popen(args, env=env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT)
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def wait_http(url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 (loopback)
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def new_session(base: str) -> str:
    request = urllib.request.Request(  # noqa: S310 (loopback)
        base + "/apps/demo/session",
        data=json.dumps({"user": 1, "pad": "x" * 100}).encode(),
        method="PATCH",
        headers={"Content-Type": "application/json", "X-CSRF": "1"},
    )
    with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
        cookie = resp.headers["Set-Cookie"]
    match = re.search(r"agent_sid=([A-Za-z0-9_-]{43})", cookie)
    assert match, cookie
    return match.group(1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(
    url: str, sid: str, seconds: int, connections: int, script: Path | None
) -> tuple[float, float, int]:
    """(requests/s, p50 ms, requests)."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    args += ["-H", f"Cookie: agent_sid={sid}"]
    if script is not None:
        args += ["-s", str(script)]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    assert p50, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p50.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{errors.group(1)} failed requests:\n{out}")
    total = re.search(r"(\d+) requests in", out)
    assert total, out
    return rps, float(p50.group(1)) * scale, int(total.group(1))


def http_costs(seconds: int, connections: int, reps: int) -> None:
    procs = Procs()
    try:
        redis_port = free_port()
        procs.start(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"])
        key = Fernet.generate_key().decode()
        bases: dict[str, str] = {}
        pids: dict[str, int] = {}
        for mode, extra in (("plain", {}), ("encrypted", {"SESSION_ENCRYPTION_KEYS": key})):
            port = free_port()
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "PYTHONPATH": str(REPO_ROOT),
                "HOST": "127.0.0.1",
                "PORT": str(port),
                "SESSION_STORE": "redis",
                "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "LOG_LEVEL": "warning",
                **extra,
            }
            procs.start([sys.executable, "-m", "app"], env=env)
            pids[mode] = procs.procs[-1].pid
            bases[mode] = f"http://127.0.0.1:{port}"
        for base in bases.values():
            wait_http(base + "/healthz")
        script = procs.tmp / "patch.lua"
        script.write_text(PATCH_LUA)
        sids = {mode: new_session(base) for mode, base in bases.items()}
        results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for _ in range(reps):
            for kind, lua in (("read (GET)", None), ("write (PATCH)", script)):
                for mode, base in bases.items():
                    pid = pids[mode]
                    before = cpu_seconds(pid)
                    rps, p50, total = wrk(
                        base + "/apps/demo/session", sids[mode], seconds, connections, lua
                    )
                    cpu_us = (cpu_seconds(pid) - before) / total * 1e6
                    results.setdefault((kind, mode), []).append((rps, p50, cpu_us))
        print(
            f"\nHTTP, one gateway process each, {connections} connections, {seconds}s x {reps} "
            "interleaved runs (median)"
        )
        print(f"{'request':>14} {'mode':>10} {'req/s':>9} {'p50 ms':>8} {'CPU us/req':>11}")
        for (kind, mode), runs in results.items():
            rps = statistics.median(r for r, _, _ in runs)
            p50 = statistics.median(p for _, p, _ in runs)
            cpu = statistics.median(c for _, _, c in runs)
            print(f"{kind:>14} {mode:>10} {rps:9.0f} {p50:8.2f} {cpu:11.1f}")
    finally:
        procs.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--codec-only", action="store_true")
    options = parser.parse_args()
    codec_costs(options.iterations)
    if not options.codec_only:
        http_costs(options.seconds, options.connections, options.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
