"""A real `python -m app` process for tests, on a free loopback port.

The process runs in a private working directory (so no stray `.env` is read) with a clean
environment: the test's variables on top of `PATH`/`HOME`-like basics, never the developer's
own gateway settings. stderr and stdout go to files (no pipe can fill up and block it), readable
at any time. It is stopped by its PID only: SIGTERM, then SIGKILL after a grace period.

Import as `from tests.gateway_process import GatewayProcess`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from app.loadkit.ports import free_port
from tests.processes import Leftovers, kill_process, signal_and_wait

REPO_ROOT = Path(__file__).resolve().parent.parent

# Variables passed through from the test runner's environment; everything else is dropped so
# a developer's SESSION_STORE / REDIS_URL / APPS_FILE cannot leak into a test process.
_PASSTHROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT", "VIRTUAL_ENV")

# Short test timeouts; a test overrides any of them through `env`.
PROCESS_TEST_ENV: dict[str, str] = {
    "HOST": "127.0.0.1",
    "LOG_LEVEL": "info",
    "SHUTDOWN_TIMEOUT_SECONDS": "3",
    "REDIS_OP_TIMEOUT_SECONDS": "1",
    "REDIS_SOCKET_TIMEOUT_SECONDS": "0.25",
    "REDIS_CONNECT_TIMEOUT_SECONDS": "0.25",
    "REDIS_POOL_TIMEOUT_SECONDS": "0.5",
    "REDIS_STARTUP_TIMEOUT_SECONDS": "3",
    "DEMO_TOKEN_DELAY_SECONDS": "0.001",
}

_LIVE: Leftovers[GatewayProcess] = Leftovers(lambda proc: proc.kill())


class GatewayProcess:
    """One `python -m app`. `start()` spawns it (and by default waits for `/healthz`)."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        cwd: str | Path | None = None,
        defaults: bool = True,
    ) -> None:
        self.port = port or free_port()
        self._own_dir = cwd is None
        self.dir = Path(cwd) if cwd else Path(tempfile.mkdtemp(prefix="gateway-test-"))
        full: dict[str, str] = {k: os.environ[k] for k in _PASSTHROUGH if k in os.environ}
        full["PYTHONPATH"] = str(REPO_ROOT)
        full["PYTHONUNBUFFERED"] = "1"
        if defaults:
            full.update(PROCESS_TEST_ENV)
        full["PORT"] = str(self.port)
        full.update(env or {})
        self.env = full
        self.stderr_path = self.dir / "stderr.log"
        self.stdout_path = self.dir / "stdout.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the gateway was not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def stderr(self) -> str:
        """Everything written to stderr so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""

    def spawn(self) -> GatewayProcess:
        """Start the process without waiting for anything."""
        with self.stderr_path.open("wb") as err, self.stdout_path.open("wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "app"],
                cwd=self.dir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        _LIVE.add(self)
        return self

    def start(self, *, timeout: float = 15.0) -> GatewayProcess:
        """Spawn and wait until `/healthz` answers 200; fails (with stderr) if it exits."""
        self.spawn()
        self.wait_healthy(timeout=timeout)
        return self

    def wait_healthy(self, *, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.returncode
            if code is not None:
                raise RuntimeError(f"gateway exited with {code} at start:\n{self.stderr}")
            if self.get_status("/healthz") == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not healthy within {timeout}s:\n{self.stderr}")
            time.sleep(0.05)

    def get_status(self, path: str, *, timeout: float = 2.0) -> int | None:
        """The HTTP status of `GET path`, or None when nothing answers."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:  # noqa: S310
                status: int = response.status
                return status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, OSError):
            return None

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit on its own; returns the exit code."""
        if self._proc is None:
            raise RuntimeError("the gateway was not started")
        return self._proc.wait(timeout=timeout)

    def signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, sig)

    def stop(self, *, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL if it has not exited after `timeout`. The exit code."""
        if self._proc is None:
            raise RuntimeError("the gateway was not started")
        if self._proc.poll() is not None:
            return self._proc.returncode
        return signal_and_wait(self._proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL by PID (cleanup path)."""
        kill_process(self._proc)

    def close(self) -> None:
        self.kill()
        _LIVE.discard(self)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def run_gateway_to_exit(
    env: Mapping[str, str], *, timeout: float = 15.0, defaults: bool = True
) -> tuple[int, str, float]:
    """Run `python -m app` expecting it to exit by itself: (exit code, stderr, seconds)."""
    proc = GatewayProcess(env, defaults=defaults)
    try:
        started = time.monotonic()
        proc.spawn()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(
                f"the gateway did not exit within {timeout}s:\n{proc.stderr}"
            ) from err
        return code, proc.stderr, time.monotonic() - started
    finally:
        proc.close()
