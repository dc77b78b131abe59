"""Drive `wrk` (the HTTP benchmarking tool, Debian package `wrk`) with a cookie-keeping script.

The Lua script sends each request with the next cookie from a file (round robin over
pre-created sessions, so requests spread over many session keys like many browsers), builds
PATCH bodies that change every time (so a write really writes), and prints one JSON line of
figures at the end. `--max-requests` stops after about that many responses (creating sessions
without cookies, for the memory benchmark).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LUA = r"""
local path, method, cookiefile, limit = "/", "GET", nil, 0
local cookies, idx, counter, seen = {}, 0, 0, 0
local pad = string.rep("x", 180)

function init(args)
  path, method, cookiefile, limit = args[1], args[2], args[3], tonumber(args[4] or "0")
  if cookiefile ~= nil and cookiefile ~= "" then
    for line in io.lines(cookiefile) do
      if line ~= "" then cookies[#cookies + 1] = line end
    end
  end
end

function request()
  local headers = {}
  if #cookies > 0 then
    idx = idx % #cookies + 1
    headers["Cookie"] = cookies[idx]
  end
  local body = nil
  if method == "PATCH" then
    counter = counter + 1
    headers["X-CSRF"] = "1"
    headers["Content-Type"] = "application/json"
    if #cookies > 0 then
      body = '{"n":' .. counter .. '}'
    else
      body = '{"p":"' .. pad .. '","n":' .. counter .. '}'
    end
  elseif method == "POST" then
    headers["X-CSRF"] = "1"
    headers["Content-Type"] = "application/json"
    headers["Accept"] = "text/event-stream"
    body = '{"input":"hello"}'
  end
  return wrk.format(method, path, headers, body)
end

function response(status, headers, body)
  if limit > 0 then
    seen = seen + 1
    if seen >= limit then wrk.thread:stop() end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    errors: int
    status_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "rps": round(self.rps, 1),
            "errors": self.errors,
            "status_errors": self.status_errors,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        }


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed: apt-get install wrk (or run scripts/system-deps)")
    return path


def write_script(directory: Path) -> Path:
    path = directory / "bench.lua"
    path.write_text(LUA)
    return path


def run_wrk(
    url: str,
    *,
    script: Path,
    method: str = "GET",
    cookie_file: Path | None = None,
    connections: int = 64,
    seconds: float = 10.0,
    max_requests: int = 0,
    cpu: int | None = None,
    timeout: float = 5.0,
) -> WrkResult:
    """One wrk run (one thread); `cpu` pins it with taskset. Raises on a wrk failure."""
    match = re.match(r"^(https?://[^/]+)(/.*)?$", url)
    if match is None:
        raise ValueError(f"bad URL {url!r}")
    base, path = match.group(1), match.group(2) or "/"
    command = [
        wrk_binary(),
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={max(1, round(timeout))}s",
        "-s",
        str(script),
        base,
        "--",
        path,
        method,
        str(cookie_file or ""),
        str(max_requests),
    ]
    if cpu is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(cpu), *command]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line.removeprefix("WRKJSON "))
            errors = sum(data[k] for k in ("connect", "read", "write", "timeout"))
            return WrkResult(
                requests=int(data["requests"]),
                seconds=data["duration_us"] / 1e6,
                errors=errors + int(data["status"]),
                status_errors=int(data["status"]),
                p50_ms=data["p50_us"] / 1e3,
                p90_ms=data["p90_us"] / 1e3,
                p99_ms=data["p99_us"] / 1e3,
                max_ms=data["max_us"] / 1e3,
            )
    raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}")
