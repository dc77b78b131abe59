"""Child processes a kit tool starts (servers under test, the stub, Redis, nginx), tracked and
stopped by PID only, with their RSS and CPU time from /proc; and waiting until one answers HTTP."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

# The directory holding the `app` package: child processes import the same gateway and kit.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


_LIVE: list[Proc] = []
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Proc:
    """A child process a kit tool started; stopped by its PID only (all at exit too)."""

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
