"""One run's events in this process: bounded, in order, with waiters for what comes next.

Sequence numbers start at 1 and have no holes; an entry is the event already framed for a
browser (`app.runs.sse.frame`). Past `max_events` entries or `max_bytes` of them, the oldest
are dropped (`first_seq` moves up): a reader whose position is before `first_seq - 1` has lost
events and is told so, never served a stream with a hole.
"""

from __future__ import annotations

import itertools
from collections import deque

from app.runs.sse import FRAME, frame
from app.runs.wakeup import Wakeup


class RunLog:
    """The framed events of one run (see the module docstring)."""

    __slots__ = (
        "_entries",
        "_wakeup",
        "added_bytes",
        "bytes",
        "end",
        "max_bytes",
        "max_events",
        "next_seq",
    )

    def __init__(self, *, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._entries: deque[bytes] = deque()
        self.next_seq = 1
        self.bytes = 0
        self.added_bytes = 0  # the framed bytes the last `extend` added
        # Why the run ended (`"done"`, or an error code); None while it runs.
        self.end: str | None = None
        self._wakeup = Wakeup()

    @property
    def first_seq(self) -> int:
        """The oldest sequence number still held (`next_seq` when none is)."""
        return self.next_seq - len(self._entries)

    def append(self, event: bytes) -> tuple[int, bytes]:
        """Add `event`; returns its sequence number and framed bytes. Wakes the waiters."""
        seq = self.next_seq
        framed = frame(seq, event)
        self._entries.append(framed)
        self.next_seq = seq + 1
        self.bytes += len(framed)
        while self._entries and (
            len(self._entries) > self.max_events or self.bytes > self.max_bytes
        ):
            self.bytes -= len(self._entries.popleft())
        self._wakeup.wake()
        return seq, framed

    def extend(self, events: list[bytes]) -> list[tuple[int, bytes]]:
        """`append` for several events at once (one trim, one wake-up): their sequence numbers
        and framed bytes."""
        seq = self.next_seq
        seqs = range(seq, seq + len(events))
        # `frame` for each, without a call each: runs call this per upstream chunk.
        framed = [FRAME % pair for pair in zip(events, seqs, strict=True)]
        entries = self._entries
        entries.extend(framed)
        self.next_seq = seqs.stop
        self.added_bytes = sum(map(len, framed))
        self.bytes += self.added_bytes
        while entries and (len(entries) > self.max_events or self.bytes > self.max_bytes):
            self.bytes -= len(entries.popleft())
        self._wakeup.wake()
        return list(zip(seqs, framed, strict=True))

    def after(self, pos: int) -> list[bytes]:
        """The framed events after sequence number `pos` (`pos + 1 >= first_seq`)."""
        start = pos + 1 - self.first_seq
        if start >= len(self._entries):
            return []
        return list(itertools.islice(self._entries, max(start, 0), None))

    def close(self, reason: str) -> None:
        """The run ended (`reason`); waiters wake and see `end`."""
        if self.end is None:
            self.end = reason
        self._wakeup.wake()

    async def wait(self, seconds: float) -> bool:
        """Wait up to `seconds` for an append or the end; False when it timed out."""
        return await self._wakeup.wait(seconds)
