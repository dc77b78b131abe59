"""The replicated topology on one machine, without Docker: Redis (AOF on), N gateway processes
(`python -m app`) and nginx in front, all on loopback, nginx configured from the same file as
deploy/compose.yaml (deploy/nginx.conf, rendered with the local ports and paths).

Run it through `scripts/cluster` (which installs .venv first). Commands:

    up [--replicas N] [--port P] ...    start everything, wait until ready, print the URL
    down                                stop everything (SIGTERM, SIGKILL after a grace)
    status                              what runs where (JSON with --json)
    restart I [--kill]                  stop replica I (SIGTERM, or SIGKILL), start it again
    rolling-restart [--settle S]        restart every replica in turn (SIGTERM)
    stop I [--kill] / start I           only stop, or only start, replica I

Every process is started with its own session and tracked by PID (and the PID's start time,
so a recycled PID is never signalled) in `<dir>/state.json`; nothing is ever looked up or
killed by name. Gateways get the caller's environment plus the topology's variables
(SESSION_STORE=redis, REDIS_URL, HOST, PORT, TRUSTED_PROXIES=127.0.0.1, LOG_FORMAT=json and a
LOG_SALT shared by the replicas); that environment is kept in `<dir>/gateway.env.json`
(mode 0600) so a restarted replica gets the same configuration.

N > 1 with SESSION_STORE=memory is refused: sessions would not be shared between replicas.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.loadkit.ports import free_port

REPO = Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = REPO / "deploy" / "nginx.conf"
DEFAULT_DIR = REPO / ".cluster"
LOOPBACK = "127.0.0.1"


class ClusterError(Exception):
    """A problem to report in one line (exit 1)."""


# -- processes by PID -----------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


@dataclass
class Proc:
    """A process we started: its PID, the PID's start time, where its output goes."""

    pid: int
    started: str
    log: str

    def alive(self) -> bool:
        return _start_time(self.pid) == self.started

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float) -> bool:
        """True once the process has exited (within `timeout`)."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            # Reap it if it is our own child (`up` and `start` are usually short-lived parents).
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, os.WNOHANG)
            time.sleep(0.02)
        return True

    def stop(self, grace: float, *, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL) and wait; SIGKILL whatever is still running after `grace`."""
        self.signal(signal.SIGKILL if kill else signal.SIGTERM)
        if not self.wait(grace):
            self.signal(signal.SIGKILL)
            self.wait(10)


def spawn(argv: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> Proc:
    with log.open("ab") as out:
        popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the caller's terminal does not reach it, and it
            # outlives `scripts/cluster up`.
            start_new_session=True,
        )
    started = None
    for _ in range(100):
        started = _start_time(popen.pid)
        if started is not None:
            break
        time.sleep(0.01)
    if started is None:
        raise ClusterError(f"{argv[0]} exited at once; see {log}")
    return Proc(pid=popen.pid, started=started, log=str(log))


def http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
            status: int = response.status
            return status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None


def wait_for(url: str, proc: Proc, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while http_status(url) != 200:
        if not proc.alive():
            raise ClusterError(f"{what} exited; last lines of {proc.log}:\n{_tail(proc.log)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} not ready within {timeout}s ({url}); see {proc.log}")
        time.sleep(0.05)


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- state ----------------------------------------------------------------------------------


@dataclass
class Replica:
    index: int
    port: int
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


@dataclass
class State:
    dir: str
    lb_port: int
    redis_port: int | None
    redis_url: str
    store: str
    python: str
    workdir: str
    replicas: list[Replica] = field(default_factory=list)
    redis: Proc | None = None
    nginx: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.lb_port}"

    @property
    def path(self) -> Path:
        return Path(self.dir) / "state.json"

    def save(self) -> None:
        data = asdict(self)
        data["url"] = self.url
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.path)

    @classmethod
    def load(cls, directory: Path) -> State:
        try:
            data: dict[str, Any] = json.loads((directory / "state.json").read_text())
        except FileNotFoundError:
            raise ClusterError(f"no cluster in {directory} (run: scripts/cluster up)") from None
        data.pop("url", None)

        def proc(value: dict[str, Any] | None) -> Proc | None:
            return Proc(**value) if value else None

        replicas = [
            Replica(index=r["index"], port=r["port"], proc=proc(r["proc"]))
            for r in data.pop("replicas")
        ]
        redis, nginx = proc(data.pop("redis")), proc(data.pop("nginx"))
        return cls(**data, replicas=replicas, redis=redis, nginx=nginx)


# -- nginx config ---------------------------------------------------------------------------

_BLOCK = re.compile(r"^([ \t]*)# cluster:(\w+)\n(.*?)^[ \t]*# cluster:end\n", re.M | re.S)


def render_nginx(template: str, *, state: State, ports: list[int]) -> str:
    """deploy/nginx.conf with its `# cluster:` blocks replaced for loopback and `state.dir`."""
    directory = Path(state.dir)
    temp = directory / "nginx-temp"

    def replace(match: re.Match[str]) -> str:
        indent, name, body = match.group(1), match.group(2), match.group(3)
        if name == "main":
            lines = [
                f"pid {directory / 'nginx.pid'};",
                f"error_log {directory / 'nginx.log'} warn;",
            ]
            if os.geteuid() == 0:
                # Workers drop root; they only need the temp directories (made writable).
                nobody = pwd.getpwnam("nobody")
                lines.insert(0, f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};")
        elif name == "http":
            lines = [f"access_log {directory / 'nginx-access.log'} agent_bff;"]
            lines += [
                f"{kind}_temp_path {temp / kind};"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            ]
        elif name in ("servers", "backups"):
            params = re.search(r"^\s*server\s+\S+\s*(.*?);", body, re.M)
            extra = f" {params.group(1)}" if params and params.group(1) else ""
            lines = [f"server {LOOPBACK}:{port}{extra};" for port in ports]
        elif name == "listen":
            lines = [f"listen {LOOPBACK}:{state.lb_port};"]
        else:
            raise ClusterError(f"{NGINX_TEMPLATE}: unknown block '# cluster:{name}'")
        return "".join(f"{indent}{line}\n" for line in lines)

    rendered, count = _BLOCK.subn(replace, template)
    if count != 5:
        raise ClusterError(f"{NGINX_TEMPLATE}: expected 5 '# cluster:' blocks, found {count}")
    return rendered


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise ClusterError(
            "nginx is not installed: run scripts/system-deps (apt-get install nginx)"
        )
    return found


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise ClusterError("redis-server is not installed: run scripts/system-deps")
    return found


# -- commands -------------------------------------------------------------------------------


def gateway_env(state: State) -> dict[str, str]:
    path = Path(state.dir) / "gateway.env.json"
    env: dict[str, str] = json.loads(path.read_text())
    return env


def start_replica(state: State, replica: Replica, timeout: float) -> None:
    env = gateway_env(state)
    env["PORT"] = str(replica.port)
    log = Path(state.dir) / f"gateway-{replica.index}.log"
    replica.proc = spawn([state.python, "-m", "app"], env=env, cwd=Path(state.workdir), log=log)
    state.save()
    wait_for(f"{replica.url}/readyz", replica.proc, timeout, f"replica {replica.index}")


def stop_replica(state: State, replica: Replica, grace: float, *, kill: bool) -> None:
    if replica.proc is not None:
        replica.proc.stop(grace, kill=kill)
    replica.proc = None
    state.save()


def cmd_up(args: argparse.Namespace) -> None:
    directory = Path(args.dir).resolve()
    if (directory / "state.json").exists():
        old = State.load(directory)
        if any(p is not None and p.alive() for p in _procs(old)):
            raise ClusterError(f"a cluster is already running from {directory}: {old.url}")
    store = args.store or os.environ.get("SESSION_STORE", "redis")
    if store not in ("redis", "memory"):
        raise ClusterError(f"--store must be redis or memory, not {store!r}")
    if store == "memory" and args.replicas > 1:
        raise ClusterError(
            "refusing to start several replicas with SESSION_STORE=memory: each process would "
            "keep its own sessions. Use --store redis (the default) or --replicas 1."
        )
    if args.replicas < 1:
        raise ClusterError("--replicas must be at least 1")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    external_redis = args.redis_url or ""
    fixed = args.port != 0
    lb_port = args.port if fixed else free_port()
    ports = [args.port + 1 + i if fixed else free_port() for i in range(args.replicas)]
    redis_port = None
    if store == "redis" and not external_redis:
        redis_port = args.redis_port or free_port()
    state = State(
        dir=str(directory),
        lb_port=lb_port,
        redis_port=redis_port,
        redis_url=external_redis or (f"redis://{LOOPBACK}:{redis_port}/0" if redis_port else ""),
        store=store,
        python=args.python,
        workdir=str(Path(args.workdir).resolve()),
        replicas=[Replica(index=i, port=port) for i, port in enumerate(ports)],
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PORT",)}
    env.update(
        {
            "SESSION_STORE": store,
            "HOST": LOOPBACK,
            "TRUSTED_PROXIES": f"{LOOPBACK}/32",
            "LOG_FORMAT": env.get("LOG_FORMAT", "json"),
            # One salt for the whole cluster: a session's log lines correlate across replicas.
            "LOG_SALT": env.get("LOG_SALT") or secrets.token_hex(16),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO),
        }
    )
    if state.redis_url:
        env["REDIS_URL"] = state.redis_url
    env_path = directory / "gateway.env.json"
    env_path.touch(mode=0o600)
    env_path.chmod(0o600)
    env_path.write_text(json.dumps(env, indent=2) + "\n")
    state.save()
    try:
        if redis_port is not None:
            redis_dir = directory / "redis"
            redis_dir.mkdir(exist_ok=True)
            state.redis = spawn(
                [
                    redis_binary(),
                    "--port", str(redis_port),
                    "--bind", LOOPBACK,
                    "--dir", str(redis_dir),
                    "--appendonly", "yes",
                    "--appendfsync", "everysec",
                    "--save", "",
                    "--daemonize", "no",
                ],
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                cwd=redis_dir,
                log=directory / "redis.log",
            )  # fmt: skip
            state.save()
            _wait_redis(redis_port, state.redis, args.timeout)
        for replica in state.replicas:
            log = Path(state.dir) / f"gateway-{replica.index}.log"
            replica_env = dict(env, PORT=str(replica.port))
            replica.proc = spawn(
                [state.python, "-m", "app"], env=replica_env, cwd=Path(state.workdir), log=log
            )
            state.save()
        for replica in state.replicas:
            assert replica.proc is not None
            wait_for(
                f"{replica.url}/readyz", replica.proc, args.timeout, f"replica {replica.index}"
            )
        _start_nginx(state, args.timeout)
    except BaseException:
        _down(state, grace=args.grace)
        raise
    print(state.url if args.quiet else _summary(state))


def _wait_redis(port: int, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5) as s:
            s.sendall(b"PING\r\n")
            if s.recv(64).startswith(b"+PONG"):
                return
        if not proc.alive():
            raise ClusterError(f"redis-server exited; see {proc.log}:\n{_tail(proc.log)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"redis-server did not answer within {timeout}s; see {proc.log}")
        time.sleep(0.05)


def _start_nginx(state: State, timeout: float) -> None:
    directory = Path(state.dir)
    temp = directory / "nginx-temp"
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (temp / kind).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # Workers run as nobody and buffer request bodies here; nothing else is in these dirs.
        for path in (temp, *temp.iterdir()):
            path.chmod(0o777)
        directory.chmod(0o711)
    conf = directory / "nginx.conf"
    ports = [r.port for r in state.replicas]
    conf.write_text(render_nginx(NGINX_TEMPLATE.read_text(), state=state, ports=ports))
    nginx = nginx_binary()
    check = subprocess.run(
        [nginx, "-t", "-q", "-e", str(directory / "nginx.log"), "-c", str(conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        raise ClusterError(f"nginx rejected {conf}:\n{check.stderr.strip()}")
    state.nginx = spawn(
        [nginx, "-e", str(directory / "nginx.log"), "-c", str(conf), "-g", "daemon off;"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        cwd=directory,
        log=directory / "nginx.log",
    )
    state.save()
    wait_for(f"{state.url}/healthz", state.nginx, timeout, "nginx")


def _procs(state: State) -> list[Proc | None]:
    return [r.proc for r in state.replicas] + [state.nginx, state.redis]


def _down(state: State, grace: float) -> None:
    # Gateways drain (SIGTERM) while nginx shuts down gracefully (SIGQUIT: finishes the
    # requests in flight, closes idle connections, so the gateways need not wait for them);
    # Redis last (SIGTERM rewrites nothing but flushes the AOF).
    replicas = [r.proc for r in state.replicas if r.proc is not None]
    for proc in replicas:
        proc.signal(signal.SIGTERM)
    if state.nginx is not None:
        state.nginx.signal(signal.SIGQUIT)
    for proc in replicas:
        proc.stop(grace)
    for other in (state.nginx, state.redis):
        if other is not None:
            other.stop(grace)
    for replica in state.replicas:
        replica.proc = None
    state.nginx = state.redis = None
    state.save()


def cmd_down(args: argparse.Namespace) -> None:
    state = State.load(Path(args.dir).resolve())
    _down(state, grace=args.grace)
    print(f"stopped the cluster in {state.dir}")


def _summary(state: State) -> str:
    lines = [f"agent-bff cluster: {state.url}  (state, config and logs in {state.dir})"]
    for r in state.replicas:
        running = "running" if r.proc and r.proc.alive() else "stopped"
        pid = r.proc.pid if r.proc else "-"
        lines.append(f"  replica {r.index}: {r.url}  pid {pid}  {running}")
    for name, proc in (("nginx", state.nginx), ("redis", state.redis)):
        if proc is not None:
            running = "running" if proc.alive() else "stopped"
            lines.append(f"  {name}: pid {proc.pid}  {running}")
    if state.redis_url:
        lines.append(f"  REDIS_URL={state.redis_url}  (AOF on)" if state.redis else "")
    if any(proc is not None and proc.alive() for proc in _procs(state)):
        lines.append("stop it with: scripts/cluster down")
    else:
        lines.append("nothing is running: start it with: scripts/cluster up")
    return "\n".join(line for line in lines if line)


def cmd_status(args: argparse.Namespace) -> None:
    state = State.load(Path(args.dir).resolve())
    if args.json:
        data = asdict(state)
        data["url"] = state.url
        for replica, entry in zip(state.replicas, data["replicas"], strict=True):
            entry["alive"] = bool(replica.proc and replica.proc.alive())
        print(json.dumps(data, indent=2))
    else:
        print(_summary(state))


def _replica(state: State, index: int) -> Replica:
    if not 0 <= index < len(state.replicas):
        raise ClusterError(f"no replica {index}: there are {len(state.replicas)} (0-based)")
    return state.replicas[index]


def cmd_stop(args: argparse.Namespace) -> None:
    state = State.load(Path(args.dir).resolve())
    stop_replica(state, _replica(state, args.index), args.grace, kill=args.kill)


def cmd_start(args: argparse.Namespace) -> None:
    state = State.load(Path(args.dir).resolve())
    replica = _replica(state, args.index)
    if replica.proc is not None and replica.proc.alive():
        raise ClusterError(f"replica {args.index} is running (pid {replica.proc.pid})")
    start_replica(state, replica, args.timeout)


def cmd_restart(args: argparse.Namespace) -> None:
    state = State.load(Path(args.dir).resolve())
    replica = _replica(state, args.index)
    stop_replica(state, replica, args.grace, kill=args.kill)
    start_replica(state, replica, args.timeout)


def cmd_rolling_restart(args: argparse.Namespace) -> None:
    state = State.load(Path(args.dir).resolve())
    for replica in state.replicas:
        started = time.monotonic()
        stop_replica(state, replica, args.grace, kill=False)
        start_replica(state, replica, args.timeout)
        print(f"replica {replica.index} restarted in {time.monotonic() - started:.1f}s")
        time.sleep(args.settle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/cluster", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="state directory (%(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="readiness wait, seconds")
    parser.add_argument(
        "--grace", type=float, default=60.0, help="SIGTERM to SIGKILL grace, seconds"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Redis, the replicas and nginx")
    up.add_argument("--replicas", type=int, default=3)
    up.add_argument(
        "--port", type=int, default=8000, help="LB port; replicas use the next N; 0: free ports"
    )
    up.add_argument("--redis-port", type=int, default=0, help="0: a free port")
    up.add_argument("--redis-url", default="", help="use this Redis instead of starting one")
    up.add_argument("--store", default=None, help="redis (default) or memory (one replica)")
    up.add_argument("--python", default=sys.executable, help="interpreter for `-m app`")
    up.add_argument("--workdir", default=str(REPO), help="gateways' working directory (.env)")
    up.add_argument("--quiet", action="store_true", help="print only the URL")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop everything").set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="show what runs")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    for name, func, text in (
        ("stop", cmd_stop, "stop replica I"),
        ("start", cmd_start, "start replica I"),
        ("restart", cmd_restart, "stop and start replica I"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("index", type=int)
        if name != "start":
            cmd.add_argument("--kill", action="store_true", help="SIGKILL instead of SIGTERM")
        cmd.set_defaults(func=func)
    rolling = sub.add_parser("rolling-restart", help="restart each replica in turn")
    rolling.add_argument("--settle", type=float, default=2.0, help="pause between replicas")
    rolling.set_defaults(func=cmd_rolling_restart)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ClusterError as err:
        print(f"scripts/cluster: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
