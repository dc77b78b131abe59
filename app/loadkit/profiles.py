"""Where the time goes: sample a running server with py-spy and fold the stacks by function.

py-spy (`pip install py-spy`, not a dependency) attaches to a process by PID without changing
it. `fold` turns its raw collapsed stacks into inclusive and self shares per function, with
the idle event loop (the process waiting for work) shown apart from the busy time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# Frames that mean "the loop waits for I/O": a sample ending here is idle time.
_IDLE_LEAVES = ("Runner.run (runners.py)", "run_forever", "_run_once", "select (selectors.py)")
# Outer frames that every (or, with uvloop's C callbacks, only some) stack starts with: listing
# them says nothing about where the time goes.
_ROOTS = frozenset(
    {"_run_module_as_main (<frozen runpy>)", "_run_code (<frozen runpy>)", "<module> (__main__.py)",
     "main (__main__.py)", "Runner.run (runners.py)", "run (runners.py)"}
)  # fmt: skip


def py_spy() -> str | None:
    """py-spy on PATH, or beside this Python (a venv's bin/ that is not on PATH)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def record(pid: int, seconds: float, out: Path, rate: int = 250) -> subprocess.Popen[bytes]:
    """Start sampling `pid` for `seconds` into `out` (raw collapsed stacks); returns at once."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed: pip install py-spy")
    return subprocess.Popen(
        [binary, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", str(rate),
         "-f", "raw", "-o", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _name(frame: str) -> str:
    """`func (path/to/file.py:12)` -> `func (file.py)`."""
    func, sep, where = frame.partition(" (")
    if not sep:
        return frame
    return f"{func} ({where.split(':')[0].rsplit('/', 1)[-1]})"


def fold(raw: Path, top: int = 30) -> dict[str, Any]:
    """Inclusive and self shares (% of busy samples) of the `top` functions."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_name(f) for f in stack.split(";")]
        total += n
        if frames[-1].startswith(_IDLE_LEAVES):
            idle += n
            continue
        for name in set(frames) - _ROOTS:
            inclusive[name] += n
        own[frames[-1]] += n
    busy = max(total - idle, 1)
    return {
        "samples": total,
        "busy_share": round((total - idle) / total, 3) if total else 0.0,
        "inclusive": [(round(100 * v / busy, 1), k) for k, v in inclusive.most_common(top)],
        "self": [(round(100 * v / busy, 1), k) for k, v in own.most_common(top)],
    }
