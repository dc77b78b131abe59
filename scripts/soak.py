#!/usr/bin/env python3
"""Bounded soak on loopback: steady mixed load through the load balancer while Redis is
restarted and a replica is killed; fails on any lost session or runaway memory.

    .venv/bin/python scripts/soak.py --duration 300            # five minutes
    .venv/bin/python scripts/soak.py --duration 15 --replicas 2 # the test suite's short run

What it does, all on 127.0.0.1, everything started here and stopped by PID at the end:
1. Redis with AOF (`--appendfsync always` by default, so an acknowledged write survives a
   crash; `everysec` may lose the last second, see docs/reliability.md) on a free port.
2. `scripts/cluster up`: N gateway replicas (`python -m app`, SESSION_STORE=redis on that
   Redis) behind nginx (deploy/nginx.conf).
3. The load kit (app/loadkit): `--concurrency` virtual users, each one browser with its own
   cookie jar, reading and writing its session and streaming the built-in demo agent through
   nginx; every user checks on every read that its session still holds what it wrote. Some
   streams are resumable runs (`resume` kind): cut at a random event and resumed through nginx
   (so on any replica) with Last-Event-ID; their gateway ids must arrive exactly once.
4. Faults while the load runs: at 35% of the duration Redis is restarted (SIGKILL, or SIGTERM
   with `--redis-restart term`) and started again on the same port and AOF; at 60% replica 1
   is SIGKILLed, and started again at 75%.
5. Resident memory (RSS) of every replica after warm-up (20%) and at the end.

The report (stdout; `--json PATH` for the machine-readable one): requests served, errors by
kind, sessions verified intact, sessions lost, RSS before/after, when each fault happened.
Exit status: 0 when no session was lost (or went stale), no resumed run whose pumping replica
lived lost or repeated an event (runs on the killed replica end with `run_orphaned`, counted
apart), every replica that lived through the
run grew by less than `--max-rss-growth-mib`, and the faults and the load really happened;
1 otherwise; 2 when the topology could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.loadkit.ports import free_port
from app.loadkit.recording import LoadConfig, Recorder
from app.loadkit.runner import run_load

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "scripts" / "cluster.py"
LOOPBACK = "127.0.0.1"
MIB = 1024 * 1024


class SoakError(Exception):
    """The topology could not be set up (exit 2)."""


# -- Redis, owned by this script (so it can be restarted) -----------------------------------


def ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")
    return False


class Redis:
    def __init__(self, directory: Path, appendfsync: str) -> None:
        self.dir = directory
        self.port = free_port()
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SoakError("redis-server is not installed: run scripts/system-deps")
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--port", str(self.port),
                    "--bind", LOOPBACK,
                    "--dir", str(self.dir),
                    "--appendonly", "yes",
                    "--appendfsync", self.appendfsync,
                    "--save", "",
                    "--daemonize", "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SoakError(f"redis-server did not start; see {self.dir / 'redis.log'}")
            time.sleep(0.02)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


# -- the cluster (scripts/cluster.py) --------------------------------------------------------


def cluster(directory: Path, *args: str, env: dict[str, str] | None = None) -> str:
    argv = [sys.executable, str(CLUSTER), "--dir", str(directory), "--timeout", "30"]
    argv += ["--grace", "10", *args]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)
    if done.returncode != 0:
        raise SoakError(f"scripts/cluster {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout.strip()


def replicas(directory: Path) -> list[dict[str, Any]]:
    state: dict[str, Any] = json.loads((directory / "state.json").read_text())
    found: list[dict[str, Any]] = state["replicas"]
    return found


def rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def replica_rss(directory: Path) -> dict[int, tuple[int, int | None]]:
    """`{index: (pid, rss bytes)}` of the replicas running now."""
    out: dict[int, tuple[int, int | None]] = {}
    for replica in replicas(directory):
        proc = replica.get("proc")
        if proc:
            out[int(replica["index"])] = (int(proc["pid"]), rss(int(proc["pid"])))
    return out


# -- the run --------------------------------------------------------------------------------


@dataclass
class Fault:
    what: str
    at: float
    seconds: float
    ok: bool = True
    detail: str = ""


@dataclass
class SoakReport:
    duration: float
    replicas: int
    concurrency: int
    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    sessions_created: int = 0
    sessions_recreated: int = 0
    continuity_checks: int = 0
    lost_sessions: int = 0
    stale_sessions: int = 0
    users_with_loss: int = 0
    streams_completed: int = 0
    aborted: int = 0
    # Resumable runs (the `resume` kind): cut at a random event, resumed through nginx.
    resume_runs: int = 0
    resume_completed: int = 0
    resume_lost_events: int = 0
    resume_duplicated_events: int = 0
    resume_orphaned: int = 0
    resume_error_events: dict[str, int] = field(default_factory=dict)
    rss_before_mib: dict[str, float] = field(default_factory=dict)
    rss_after_mib: dict[str, float] = field(default_factory=dict)
    rss_growth_mib: dict[str, float] = field(default_factory=dict)
    max_rss_growth_mib: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


async def run(args: argparse.Namespace, workdir: Path) -> SoakReport:
    report = SoakReport(
        duration=args.duration,
        replicas=args.replicas,
        concurrency=args.concurrency,
        max_rss_growth_mib=args.max_rss_growth_mib,
    )
    redis = Redis(workdir / "redis", args.appendfsync)
    cluster_dir = workdir / "cluster"
    gateway_dir = workdir / "gateway"
    gateway_dir.mkdir(parents=True, exist_ok=True)  # no stray .env is read by the replicas
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SESSION_", "REDIS_"))}
    env.pop("APPS_FILE", None)
    env.update(
        {
            "SESSION_STORE": "redis",
            "LOG_LEVEL": "warning",
            "DEMO_TOKEN_DELAY_SECONDS": str(args.token_delay),
            "SHUTDOWN_TIMEOUT_SECONDS": "5",
            "SHUTDOWN_IDLE_GRACE_SECONDS": "3",
        }
    )
    redis.start()
    started_cluster = False
    try:
        url = cluster(
            cluster_dir,
            "up",
            "--replicas", str(args.replicas),
            "--port", "0",
            "--redis-url", redis.url,
            "--workdir", str(gateway_dir),
            "--quiet",
            env=env,
        )  # fmt: skip
        started_cluster = True
        config = LoadConfig(
            url=url,
            app="demo",
            concurrency=args.concurrency,
            duration=args.duration,
            mix={"read": 45.0, "write": 25.0, "stream": 15.0, "resume": 15.0},
            agent_path="chat",
            stream_body=b'{"message": "soak"}',
            end_event="done",
            timeout=10.0,
            stream_idle_timeout=10.0,
            grace=10.0,
            seed=args.seed,
        )
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rss_before: dict[int, tuple[int, int | None]] = {}

        async def at(fraction: float) -> None:
            await asyncio.sleep(max(0.0, t0 + args.duration * fraction - loop.time()))

        async def faults() -> None:
            nonlocal rss_before
            await at(0.20)
            rss_before = replica_rss(cluster_dir)
            await at(0.35)
            began = loop.time()
            sig = signal.SIGKILL if args.redis_restart == "kill" else signal.SIGTERM
            await asyncio.to_thread(redis.stop, sig)
            await asyncio.to_thread(redis.start)
            report.faults.append(
                Fault(f"redis restart ({sig.name}, AOF {args.appendfsync})", began - t0,
                      loop.time() - began)
            )  # fmt: skip
            if args.replicas > 1:
                await at(0.60)
                began = loop.time()
                await asyncio.to_thread(cluster, cluster_dir, "stop", "1", "--kill")
                report.faults.append(Fault("replica 1 SIGKILL", began - t0, loop.time() - began))
                await at(0.75)
                began = loop.time()
                await asyncio.to_thread(cluster, cluster_dir, "start", "1")
                report.faults.append(Fault("replica 1 start", began - t0, loop.time() - began))

        injector = asyncio.create_task(faults())
        recorder = await run_load(config)
        try:
            await asyncio.wait_for(injector, 60)
        except Exception as err:  # a failed fault is a failed soak, reported, not a crash
            report.problems.append(f"fault injection failed: {err!r}")
        rss_after = replica_rss(cluster_dir)
        summarize(report, recorder, rss_before, rss_after, args)
    finally:
        if started_cluster:
            with contextlib.suppress(SoakError):
                cluster(cluster_dir, "down")
        redis.stop()
    return report


def summarize(
    report: SoakReport,
    rec: Recorder,
    before: dict[int, tuple[int, int | None]],
    after: dict[int, tuple[int, int | None]],
    args: argparse.Namespace,
) -> None:
    report.requests = rec.total
    report.ok = sum(rec.ok.values())
    report.errors = {f"{kind}:{error}": n for (kind, error), n in sorted(rec.errors.items())}
    report.sessions_created = rec.sessions_created
    report.sessions_recreated = rec.sessions_recreated
    report.continuity_checks = rec.checks
    report.lost_sessions = rec.lost
    report.stale_sessions = rec.stale
    report.users_with_loss = len(rec.users_with_loss)
    report.streams_completed = rec.streams_completed
    report.aborted = rec.aborted
    report.resume_runs = rec.resume.runs
    report.resume_completed = rec.resume.completed
    report.resume_lost_events = rec.resume.lost
    report.resume_duplicated_events = rec.resume.duplicated
    report.resume_orphaned = rec.resume.orphaned
    report.resume_error_events = dict(rec.resume.error_events)
    if rec.resume.lost or rec.resume.duplicated:
        report.problems.append(
            f"resumed runs whose pumping replica lived lost {rec.resume.lost} and duplicated "
            f"{rec.resume.duplicated} events"
        )
    if not rec.resume.completed:
        report.problems.append("no resumable run was read to its end")
    for index, (pid, value) in sorted(before.items()):
        if value is not None:
            report.rss_before_mib[str(index)] = round(value / MIB, 1)
        later = after.get(index)
        if later is None or later[1] is None or value is None:
            continue
        report.rss_after_mib[str(index)] = round(later[1] / MIB, 1)
        if later[0] == pid:  # the same process lived through the whole run
            growth = (later[1] - value) / MIB
            report.rss_growth_mib[str(index)] = round(growth, 1)
            if growth > args.max_rss_growth_mib:
                report.problems.append(
                    f"replica {index} grew {growth:.1f} MiB (bound {args.max_rss_growth_mib})"
                )
    if rec.lost or rec.stale:
        report.problems.append(f"{rec.lost} lost and {rec.stale} stale session reads")
    if not report.rss_growth_mib:
        report.problems.append("no replica could be measured before and after")
    if report.ok < args.min_requests:
        report.problems.append(f"only {report.ok} requests succeeded (< {args.min_requests})")
    if rec.checks < args.concurrency:
        report.problems.append(f"only {rec.checks} session continuity checks ran")
    expected_faults = 3 if args.replicas > 1 else 1
    if len(report.faults) < expected_faults:
        report.problems.append("not every fault was injected")


def format_report(report: SoakReport) -> str:
    lines = [
        f"soak: {report.duration:.0f}s, {report.replicas} replicas behind nginx, "
        f"{report.concurrency} virtual users",
        f"requests: {report.requests} ({report.ok} ok), streams completed "
        f"{report.streams_completed}, aborted at the deadline {report.aborted}",
        "errors by kind: " + (", ".join(f"{k}={v}" for k, v in report.errors.items()) or "none"),
        f"sessions: {report.sessions_created} created, {report.sessions_recreated} re-created "
        f"after a failed write, {report.continuity_checks} verified intact, "
        f"{report.lost_sessions} lost, {report.stale_sessions} stale",
        f"resumable runs: {report.resume_runs} cut and resumed, {report.resume_completed} read "
        f"to the end, {report.resume_lost_events} events lost and "
        f"{report.resume_duplicated_events} duplicated (runs whose pumper lived), "
        f"{report.resume_orphaned} orphaned by the killed replica; error events "
        + (", ".join(f"{k}={v}" for k, v in report.resume_error_events.items()) or "none"),
    ]
    for fault in report.faults:
        lines.append(f"fault at {fault.at:5.1f}s: {fault.what} (took {fault.seconds:.2f}s)")
    for index, before in report.rss_before_mib.items():
        after = report.rss_after_mib.get(index)
        growth = report.rss_growth_mib.get(index)
        note = f"{growth:+.1f} MiB" if growth is not None else "restarted during the run"
        lines.append(f"replica {index} RSS: {before} MiB -> {after} MiB ({note})")
    lines.append(f"RSS growth bound: {report.max_rss_growth_mib} MiB per replica")
    lines.append("PASSED" if report.passed else "FAILED: " + "; ".join(report.problems))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/soak.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=12, help="virtual users")
    parser.add_argument("--token-delay", type=float, default=0.01, help="demo agent pacing")
    parser.add_argument("--redis-restart", choices=("kill", "term"), default="kill")
    parser.add_argument("--appendfsync", choices=("always", "everysec"), default="always")
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0)
    parser.add_argument("--min-requests", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the JSON report")
    args = parser.parse_args(argv)
    if args.duration < 5:
        parser.error("--duration must be at least 5 seconds")
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="agent-bff-soak-"))
    try:
        report = asyncio.run(run(args, workdir))
    except SoakError as err:
        print(f"soak: {err}", file=sys.stderr)
        return 2
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(format_report(report))
    if args.json:
        payload = asdict(report) | {"passed": report.passed}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
