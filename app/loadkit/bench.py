"""The benchmark suite: the gateway beside its peers, measured in one run, as ratios.

    agent-bff-bench              # the full run (about 8 minutes); scripts/bench.py in a checkout
    agent-bff-bench --smoke      # every row once, briefly (about 30 s)

Layout (2+ cores): every server under test (gateway, peers, nginx, and the upstream stub)
pinned to CPU 0 with `taskset`; wrk, Redis, the kit and this script on CPU 1. The SSE rows
therefore put the stub on CPU 0 beside the proxy (gateway or nginx) and beside nothing for the
direct row. Rows run interleaved (row 1..N, then again) so drift hits every row alike; each
figure is the median of the repetitions with min and max beside it.

Rows: session read (`GET`) and write (`PATCH`, which also reads) through the gateway on Redis
and on the memory store; the same on aiohttp-session's stock `RedisStorage`; a no-session
aiohttp handler and one doing one raw redis-py `GET` (ceilings); SSE relay of 50 events of 200
bytes direct / through the gateway (session on) / through nginx (`proxy_buffering off`). Then:
Redis commands per request (`INFO commandstats`), time to first event added by each proxy,
RSS of the memory store holding 100k sessions, RSS before/after a mixed run with the kit.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import redis

from app.loadkit import profiles
from app.loadkit.ports import free_port
from app.loadkit.sse import SSEParser
from app.loadkit.wrk import WrkResult, run_wrk, write_script, wrk_binary

# The directory holding the `app` package: child processes import the same gateway and kit.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
SESSION_PATH = "/apps/demo/session"
AGENT_PATH = "/apps/demo/agent/stream"
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


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    reps: int = 3
    seconds: float = 8.0
    warmup: float = 2.0
    connections: int = 64
    sse_connections: int = 32
    sessions: int = 1000
    ttfe_streams: int = 300
    active_runs: int = 200
    memory_sessions: int = 100_000
    mixed_warmup: float = 10.0
    mixed_seconds: float = 60.0
    mixed_users: int = 50
    server_cpu: int | None = 0
    client_cpu: int | None = 1
    rows: tuple[str, ...] = ()
    log_level_row: bool = True
    # Rows for what optional features cost on top of the default configuration: the Redis
    # gateway with SESSION_ENCRYPTION_KEYS, and SSE through one whose application has rate
    # limits (never reached: the cost of checking them).
    cost_rows: bool = True
    profile: tuple[str, ...] = ()  # row keys to sample with py-spy after the measured runs

    @classmethod
    def smoke(cls) -> Options:
        return cls(
            reps=1,
            seconds=1.0,
            warmup=0.0,
            connections=16,
            sse_connections=8,
            sessions=20,
            ttfe_streams=10,
            active_runs=20,
            memory_sessions=2000,
            mixed_warmup=0.5,
            mixed_seconds=1.0,
            mixed_users=8,
            log_level_row=False,
        )


# -- processes ------------------------------------------------------------------------------


_LIVE: list[Proc] = []
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Proc:
    """A child process this script started; stopped by its PID only."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        cpu: int | None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        log: Path,
    ) -> None:
        self.name = name
        if cpu is not None and shutil.which("taskset"):
            command = ["taskset", "-c", str(cpu), *command]
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self.log = log
        _LIVE.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def rss_mb(self) -> float:
        """Resident set size of the process (and of its children: nginx's worker)."""
        total_kb = 0
        for pid in [self.pid, *_children(self.pid)]:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
        return total_kb / 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the process (and its children: nginx's
        worker), from /proc: unaffected by how long other work kept it waiting."""
        ticks = 0
        for pid in [self.pid, *_children(self.pid)]:
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / _CLK_TCK

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@atexit.register
def _stop_all() -> None:
    for proc in list(reversed(_LIVE)):
        proc.stop()


def wait_http(url: str, proc: Proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited at start:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback only
                return
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} did not answer at {url}:\n{proc.tail()}")
        time.sleep(0.05)


# -- the environment ------------------------------------------------------------------------


@dataclass
class Lab:
    """Every process of one bench run and where it listens."""

    options: Options
    tmp: Path
    redis_port: int = 0
    stub_port: int = 0
    urls: dict[str, str] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    cookies: dict[str, Path] = field(default_factory=dict)
    pending: list[tuple[str, Proc]] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def redis(self) -> redis.Redis:
        return redis.Redis(port=self.redis_port, socket_timeout=5, protocol=2)

    def start(self, name: str, command: Sequence[str], *, cpu: int | None, **kw: Any) -> Proc:
        proc = Proc(name, command, cpu=cpu, log=self.tmp / f"{name}.log", **kw)
        self.procs[name] = proc
        return proc

    def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/system-deps)")
        self.redis_port = free_port()
        # Redis beside the load generator on the client CPU (the layout).
        proc = self.start(
            "redis",
            [
                binary,
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            cpu=self.options.client_cpu,
        )
        client = self.redis()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or not proc.alive():
                    raise RuntimeError(f"redis-server did not start:\n{proc.tail()}") from None
                time.sleep(0.05)
        client.close()

    def start_stub(self) -> None:
        self.stub_port = free_port()
        proc = self.start(
            "stub",
            [
                sys.executable,
                "-m",
                "app.loadkit.stub",
                "--port",
                str(self.stub_port),
                "--events",
                "50",
                "--size",
                "200",
            ],
            cpu=self.options.server_cpu,
        )
        self.urls["stub"] = f"http://127.0.0.1:{self.stub_port}"
        wait_http(self.urls["stub"] + "/healthz", proc)

    def wait_all(self) -> None:
        """Wait for every server started with `wait=False` (they start in parallel)."""
        while self.pending:
            url, proc = self.pending.pop(0)
            wait_http(url, proc)

    def start_gateway(
        self, name: str, store: str, *, wait: bool = True, app_extra: str = "", **env: str
    ) -> None:
        """`python -m app` on CPU 0 with application `demo` (upstream: the stub; `app_extra`:
        more TOML lines for it) and `env` on top of the defaults."""
        port = free_port()
        workdir = self.tmp / name
        workdir.mkdir(exist_ok=True)  # no stray .env is read from here
        apps = workdir / "apps.toml"
        apps.write_text(
            f'[apps.demo]\nupstream = "http://127.0.0.1:{self.stub_port}/base"\n{app_extra}'
        )
        full = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(PACKAGE_ROOT),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "SESSION_STORE": store,
            "APPS_FILE": str(apps),
            **env,
        }
        if store == "redis":
            full["REDIS_URL"] = self.redis_url
        proc = self.start(
            name, [sys.executable, "-m", "app"], cpu=self.options.server_cpu, env=full, cwd=workdir
        )
        self.urls[name] = f"http://127.0.0.1:{port}"
        self.pending.append((self.urls[name] + "/healthz", proc))
        if wait:
            self.wait_all()

    def start_peer(self, name: str, kind: str) -> None:
        port = free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(PACKAGE_ROOT),
        }
        proc = self.start(
            name,
            [
                sys.executable,
                "-m",
                "app.loadkit.peers",
                "--kind",
                kind,
                "--port",
                str(port),
                "--redis",
                self.redis_url,
            ],
            cpu=self.options.server_cpu,
            env=env,
        )
        self.urls[name] = f"http://127.0.0.1:{port}"
        self.pending.append((self.urls[name] + SESSION_PATH, proc))

    def start_nginx(self) -> bool:
        binary = shutil.which("nginx") or (
            "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
        )
        if binary is None:
            return False
        port = free_port()
        prefix = self.tmp / "nginx"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(
            f"""{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  upstream stub {{ server 127.0.0.1:{self.stub_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location /apps/demo/agent/ {{
      proxy_pass http://stub/base/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
    location = /healthz {{ return 200 "ok"; }}
  }}
}}
"""
        )
        proc = self.start(
            "nginx", [binary, "-p", str(prefix), "-c", str(conf)], cpu=self.options.server_cpu
        )
        self.urls["nginx"] = f"http://127.0.0.1:{port}"
        wait_http(self.urls["nginx"] + "/healthz", proc)
        return True

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()


async def create_sessions(base: str, count: int) -> list[str]:
    """`count` sessions created through `PATCH` (cookie-less, one each): `name=value` lines."""
    lines: list[str] = []
    sem = asyncio.Semaphore(32)

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        async with (
            sem,
            http.patch(
                base + SESSION_PATH,
                json={"user": i, "pad": "x" * 100},
                headers={"X-CSRF": "1"},
            ) as resp,
        ):
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"creating a session at {base}: HTTP {resp.status}")
            for name, morsel in resp.cookies.items():
                lines.append(f"{name}={morsel.value}")

    jar = aiohttp.DummyCookieJar()  # every request cookie-less: a new session each
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        await asyncio.gather(*(one(http, i) for i in range(count)))
    if len(lines) != count:
        raise RuntimeError(f"{base}: expected {count} session cookies, got {len(lines)}")
    return lines


def raw_sessions(lab: Lab, count: int) -> list[str]:
    """Keys for the raw-GET ceiling, stored directly: the same value shape as the gateway's."""
    client = lab.redis()
    lines = []
    with client.pipeline(transaction=False) as pipe:
        for i in range(count):
            sid = secrets.token_urlsafe(32)
            value = {"v": 1, "data": {"user": i, "pad": "x" * 100}, "gw": {}}
            pipe.set(f"bench:raw:{sid}", json.dumps(value), ex=3600)
            lines.append(f"sid={sid}")
        pipe.execute()
    client.close()
    return lines


# -- rows -----------------------------------------------------------------------------------


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


# Limits far above what the run sends: every request pays for the check, none is refused.
UNREACHED_LIMITS = 'rate_limit_per_session = "100000000/s"\nrate_limit_per_app = "100000000/s"\n'


@dataclass
class RowResult:
    row: Row
    runs: list[WrkResult] = field(default_factory=list)
    redis_commands: list[float] = field(default_factory=list)
    commands: dict[str, float] = field(default_factory=dict)
    cpu_us: list[float] = field(default_factory=list)  # server CPU per request, per run
    # The row's own server only (without the stub behind a proxy), per request, per run.
    own_cpu_us: list[float] = field(default_factory=list)

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


def run_row(lab: Lab, row: Row, script: Path, seconds: float, result: RowResult | None) -> None:
    o = lab.options
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


# -- time to first event --------------------------------------------------------------------


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


# -- memory ---------------------------------------------------------------------------------


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
        seconds=max(10.0, o.memory_sessions / 1000),
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


# -- the run --------------------------------------------------------------------------------


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


def _rps(results: dict[str, Any], key: str) -> float | None:
    row = results["rows"].get(key)
    return None if row is None else row["rps_median"]


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

    ratio("gateway Redis read / stock RedisStorage read", "gw_redis_read", "stock_read", 2.0)
    ratio("gateway Redis write / stock RedisStorage write", "gw_redis_write", "stock_write", 1.5)
    ratio("gateway memory read / no-session handler", "gw_mem_read", "nosession", 0.85)
    ratio("gateway memory write / no-session handler", "gw_mem_write", "nosession", 0.85)
    ratio("(ceiling) one redis-py GET / no-session handler", "rawget", "nosession", 0.0)
    ratio("(peer) stock RedisStorage read / one redis-py GET", "stock_read", "rawget", 0.0)
    ratio("gateway Redis read / one redis-py GET", "gw_redis_read", "rawget", 0.0)
    # What the optional features cost (the targets are for the default configuration).
    ratio("(cost) encrypted Redis read / plain Redis read", "gw_redis_read_enc", "gw_redis_read", 0)
    ratio("(cost) encrypted Redis write / plain", "gw_redis_write_enc", "gw_redis_write", 0)
    ratio("(cost) SSE with rate limits / without", "sse_gateway_limited", "sse_gateway", 0.0)
    plain, resumable = rows_of(results, "sse_gateway"), rows_of(results, "sse_gateway_resumable")
    if plain and resumable and plain["own_cpu_us_per_request"]:
        value = resumable["own_cpu_us_per_request"] / plain["own_cpu_us_per_request"]
        out.append(
            {
                "name": "gateway CPU per stream: resumable run (Redis) / plain relay",
                "value": round(value, 3),
                "target": 1.3,
                "op": "<=",
                "met": value <= 1.3,
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


# -- resumable runs -------------------------------------------------------------------------

RESUMABLE_APP = "resumable = true\nresume_window_seconds = 2\n"


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
