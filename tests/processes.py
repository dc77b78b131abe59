"""Stopping the child processes the test harness starts (`redis-server`, Sentinels,
`python -m app`): always by PID, always reaped, and a last-resort cleanup at interpreter exit.

Import as `from tests.processes import Leftovers, kill_process, signal_and_wait`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def kill_process(proc: subprocess.Popen[Any] | None) -> None:
    """SIGKILL `proc` by PID if it is still running, then reap it (wait up to 10 s)."""
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def signal_and_wait(proc: subprocess.Popen[Any], sig: signal.Signals, timeout: float) -> int:
    """Send `sig` by PID and wait up to `timeout` s for the exit; SIGKILL (and reap) it if it
    has not exited by then. Returns the exit code."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process(proc)
        return proc.wait(timeout=10)


class Leftovers(Generic[T]):
    """The objects whose processes are still running: `cleanup` is called on each one still
    tracked at interpreter exit (a run that skips fixture teardown leaks no process)."""

    def __init__(self, cleanup: Callable[[T], None]) -> None:
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()
        self._cleanup = cleanup
        atexit.register(self.clean_up)

    def add(self, obj: T) -> None:
        self._live.add(obj)

    def discard(self, obj: T) -> None:
        self._live.discard(obj)

    def clean_up(self) -> None:
        for obj in list(self._live):
            self._cleanup(obj)
