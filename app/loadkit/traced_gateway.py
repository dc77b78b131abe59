"""`python -m app` under tracemalloc, for `app.loadkit.concurrency --tracemalloc-dump`: SIGUSR1
writes a snapshot to `$LOADKIT_TRACEMALLOC_DUMP` (read it with `tracemalloc.Snapshot.load`).

A profiling aid only (tracemalloc slows allocation several times over); never a way to serve.
"""

from __future__ import annotations

import os
import runpy
import signal
import tracemalloc
from types import FrameType

FRAMES = 8


def _dump(signum: int, frame: FrameType | None) -> None:
    tracemalloc.take_snapshot().dump(os.environ["LOADKIT_TRACEMALLOC_DUMP"])


def main() -> None:
    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR1, _dump)
    runpy.run_module("app", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
