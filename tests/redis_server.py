"""A real `redis-server` for tests: started on a free loopback port in its own directory.

`RedisServer` owns exactly one process and only ever signals that PID. It can be killed
(SIGKILL by default), stopped, restarted on the same port and directory (so an AOF file is
reloaded), and frozen with SIGSTOP / thawed with SIGCONT. Cleanup is guaranteed by `close()`,
the context manager, and an `atexit` hook for interpreter exits that skip fixtures.

Helpers for assertions: `RedisServer.client()` (a sync `redis.Redis`, bytes in and out),
`command_calls()` (per-command call counts from `INFO commandstats`) and `free_port()`.

Import as `from tests.redis_server import RedisServer`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from app.loadkit.ports import free_port
from tests.processes import Leftovers, signal_and_wait

# Every server still running at interpreter exit is killed (by its PID).
_LIVE: Leftovers[RedisServer] = Leftovers(lambda server: server.close())


def redis_server_binary() -> str:
    """Path of `redis-server`, or a clear failure telling how to install it."""
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(
            "redis-server is not installed (needed by the real-Redis tests): run "
            "scripts/system-deps or `apt-get install redis-server`"
        )
    return path


def command_calls(client: redis.Redis) -> dict[str, int]:
    """`INFO commandstats` as `{"getex": 3, "set": 1, ...}` (lower-case names, calls only).

    Reset with `client.config_resetstat()`. The `info`/`config` calls used to observe are
    counted by Redis too; compare only the commands you care about.
    """
    info: dict[str, Any] = client.info("commandstats")
    calls: dict[str, int] = {}
    for name, stats in info.items():
        command = name.removeprefix("cmdstat_").lower()
        calls[command] = int(stats["calls"]) if isinstance(stats, dict) else 0
    return calls


class RedisServer:
    """One `redis-server` process on `127.0.0.1:<free port>` in a private directory.

    Options: `appendonly` (AOF on/off; RDB snapshots are always off: `--save ""`), `password`
    (`--requirepass`; then `url` carries it), `extra_args` (appended verbatim, e.g.
    `["--maxmemory", "1mb"]`). `DEBUG` is enabled for local connections (`DEBUG SLEEP` etc.).
    Call `start()` (or use it as a context manager) and `close()` when done.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        directory: str | Path | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.appendonly = appendonly
        self.password = password
        self.extra_args = list(extra_args)
        self.port = port or 0
        self.start_timeout = start_timeout
        self._own_dir = directory is None
        self.dir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="redis-test-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    # -- addresses ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        """`redis://[:password@]127.0.0.1:<port>/0`."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("redis-server is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no redis log>"

    # -- lifecycle ------------------------------------------------------------------------

    def _command(self) -> list[str]:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--enable-debug-command",
            "local",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        return args + self.extra_args

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING. Picks a free port the first time."""
        if self.running:
            return self
        fixed = bool(self.port)
        last_error = ""
        for _ in range(1 if fixed else 5):
            if not fixed:
                self.port = free_port()
            self._spawn()
            try:
                self._wait_ready()
                return self
            except RuntimeError as err:  # e.g. the port was taken meanwhile: try another
                last_error = str(err)
                self._terminate(signal.SIGKILL)
        raise RuntimeError(last_error)

    def _spawn(self) -> None:
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
            # Own process group: a Ctrl-C in the terminal reaches pytest, not redis.
            start_new_session=True,
        )
        self._paused = False
        _LIVE.add(self)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        client = self.client(socket_timeout=0.5)
        try:
            while True:
                if self._proc is None or self._proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited at start (port {self.port}):\n{self.log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not answer PING within {self.start_timeout}s "
                        f"(port {self.port}):\n{self.log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def _terminate(self, sig: signal.Signals, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if self._paused and sig != signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM
            signal_and_wait(proc, sig, timeout)
        self._proc = None
        self._paused = False

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig` (default SIGKILL: a crash, nothing flushed) and wait until it exited."""
        self._terminate(sig)

    def stop(self) -> None:
        """Graceful stop (SIGTERM; SIGKILL if it does not exit within 10 s)."""
        self._terminate(signal.SIGTERM)

    def restart(self, *, kill_first: bool = False) -> RedisServer:
        """Start again on the same port and directory (an AOF is reloaded). Stops it first if
        running (SIGTERM, or SIGKILL with `kill_first`)."""
        if self.running:
            self._terminate(signal.SIGKILL if kill_first else signal.SIGTERM)
        port = self.port
        for _ in range(50):
            self._spawn()
            try:
                self._wait_ready()
                return self
            except RuntimeError:
                # The port can be briefly unavailable right after the old process died.
                self._terminate(signal.SIGKILL)
                self.port = port
                time.sleep(0.1)
        raise RuntimeError(f"redis-server could not restart on port {port}:\n{self.log_tail()}")

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open but nothing answers."""
        if self._proc is None:
            raise RuntimeError("redis-server is not running")
        os.kill(self._proc.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Thaw a paused process (SIGCONT)."""
        if self._proc is None:
            raise RuntimeError("redis-server is not running")
        os.kill(self._proc.pid, signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Kill the process (if any) and remove the directory (if this object created it)."""
        self._terminate(signal.SIGKILL)
        _LIVE.discard(self)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- assertions -----------------------------------------------------------------------

    def client(self, *, socket_timeout: float = 5.0) -> redis.Redis:
        """A sync client for assertions: bytes in and out (`decode_responses=False`)."""
        return redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            decode_responses=False,
            protocol=2,
            # No retries: an assertion about a dead or frozen server must fail at once.
            retry=Retry(NoBackoff(), 0),
        )

    def reset(self) -> None:
        """FLUSHALL and CONFIG RESETSTAT: a clean server for the next test."""
        with contextlib.closing(self.client()) as client:
            client.flushall()
            client.config_resetstat()

    def command_calls(self) -> dict[str, int]:
        """Call counts per command since the last reset (see `command_calls`)."""
        with contextlib.closing(self.client()) as client:
            return command_calls(client)

    def client_names(self) -> list[str]:
        """The `name` of every connection currently open (CLIENT LIST), ours excluded."""
        with contextlib.closing(self.client()) as client:
            clients: list[dict[str, Any]] = client.client_list()
            own = client.client_id()
        names: list[str] = []
        for entry in clients:
            if str(entry.get("id")) == str(own):
                continue
            name = entry.get("name", "")
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return names
