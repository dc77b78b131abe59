"""The bench's environment: every process of one run (Redis, the stub, gateways, peers, nginx),
where each listens, and the sessions created up front for the rows' cookies."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from app.loadkit.bench.options import SESSION_PATH, Options
from app.loadkit.ports import free_port
from app.loadkit.processes import PACKAGE_ROOT, Proc, wait_http


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


# Limits far above what the run sends: every request pays for the check, none is refused.
UNREACHED_LIMITS = 'rate_limit_per_session = "100000000/s"\nrate_limit_per_app = "100000000/s"\n'

# Every stream of the row a run: the budget far above what the runs of two windows hold
# (~1,600 runs/s of ~27 KB counted each filled the default 64 MiB in about a second, and the
# rest were relayed without resume: the row measured a mix). `ratios` reports the share.
RESUMABLE_APP = (
    "resumable = true\nresume_window_seconds = 2\nresume_redis_budget_bytes = 4294967296\n"
)
