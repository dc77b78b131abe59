"""The servers of a concurrency run (app/loadkit/concurrency.py): the upstream stub and one
gateway, started and stopped by PID, pinned apart on two CPUs; and the open-file limit the
streams need."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from app.loadkit.ports import free_port
from app.loadkit.processes import PACKAGE_ROOT, Proc, wait_http

if TYPE_CHECKING:
    from app.loadkit.concurrency import ScaleOptions


def raise_open_files() -> tuple[int, int]:
    """Soft `RLIMIT_NOFILE` up to the hard limit (children inherit it); returns the new pair."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _pinning(pin: bool) -> tuple[int | None, int | None]:
    """(server CPU, client CPU): 0 and 1 when there are two CPUs and `taskset`."""
    if pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return 0, 1
    return None, None


class Servers:
    """The stub and the gateway of one run, started and stopped by PID."""

    def __init__(self, options: ScaleOptions, tmp: Path) -> None:
        self.options = options
        self.tmp = tmp
        self.server_cpu, self.client_cpu = _pinning(options.pin)
        self.procs: list[Proc] = []
        self.stub_url = ""
        self.gateway_url = ""
        self.gateway: Proc | None = None

    def start(self) -> None:
        o = self.options
        stub_port, gateway_port = free_port(), free_port()
        stub = Proc(
            "stub",
            [
                sys.executable,
                "-m",
                "app.loadkit.stub",
                "--port",
                str(stub_port),
                "--events",
                str(o.events),
                "--size",
                str(o.size),
                "--pause-ms",
                str(o.pause_ms),
                "--stamp",
            ],
            cpu=self.client_cpu,
            log=self.tmp / "stub.log",
        )
        self.procs.append(stub)
        self.stub_url = f"http://127.0.0.1:{stub_port}"
        wait_http(self.stub_url + "/healthz", stub)
        apps = self.tmp / "apps.toml"
        apps.write_text(
            "[apps.demo]\n"
            f'upstream = "{self.stub_url}/base"\n'
            f"max_concurrent_requests = {o.streams + o.warmup_streams}\n"
            "max_concurrent_per_client = 0\n"
            "max_concurrent_per_session = 0\n"
        )
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(PACKAGE_ROOT),
            "HOST": "127.0.0.1",
            "PORT": str(gateway_port),
            "SESSION_STORE": "memory",
            "APPS_FILE": str(apps),
            "UPSTREAM_POOL_SIZE": str(o.streams + o.warmup_streams),
            "MEMORY_MAX_SESSIONS": str(max(100_000, 2 * o.streams)),
            **dict(o.gateway_env),
        }
        command = [sys.executable, "-m", "app"]
        if o.tracemalloc_dump is not None:
            env["LOADKIT_TRACEMALLOC_DUMP"] = str(o.tracemalloc_dump)
            command = [sys.executable, "-m", "app.loadkit.traced_gateway"]
        gateway = Proc(
            "gateway", command, cpu=self.server_cpu, env=env, cwd=self.tmp, log=self.tmp / "gw.log"
        )
        self.procs.append(gateway)
        self.gateway = gateway
        self.gateway_url = f"http://127.0.0.1:{gateway_port}"
        wait_http(self.gateway_url + "/healthz", gateway)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
