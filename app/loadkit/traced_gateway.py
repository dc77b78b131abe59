"""`python -m app` with tracemalloc on demand, for `app.loadkit.concurrency --tracemalloc-dump`:
SIGUSR2 starts tracing (so only what is allocated from then on is traced: the streams, not
start-up or the sessions made before), SIGUSR1 writes a snapshot to
`$LOADKIT_TRACEMALLOC_DUMP` (read it with `tracemalloc.Snapshot.load`).

A profiling aid only (tracing slows allocation several times over); never a way to serve.
"""

from __future__ import annotations

import os
import runpy
import signal
import tracemalloc
from types import FrameType

FRAMES = 6


def _start(signum: int, frame: FrameType | None) -> None:
    tracemalloc.start(FRAMES)


def _dump(signum: int, frame: FrameType | None) -> None:
    tracemalloc.take_snapshot().dump(os.environ["LOADKIT_TRACEMALLOC_DUMP"])


def main() -> None:
    signal.signal(signal.SIGUSR2, _start)
    signal.signal(signal.SIGUSR1, _dump)
    runpy.run_module("app", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
