"""Reading one SSE answer as a virtual user does: a stream's events with their arrival times and
completeness (`StreamRead`), a resumable run's gateway ids over several connections (`RunRead`),
and the gateway's JSON error code."""

from __future__ import annotations

import json
import time

from app.loadkit.recording import Recorder, ResumeCounts
from app.loadkit.sse import SSEParser


class RunRead:
    """The events of one run over several connections: gateway ids, end, error code."""

    def __init__(self, end_event: str) -> None:
        self.end_event = end_event
        self.parser = SSEParser()
        self.ids: list[int] = []
        self.end_seen = False
        self.error_code: str | None = None

    @property
    def finished(self) -> bool:
        return self.end_seen or self.error_code is not None

    def restart(self) -> None:
        """A new connection: a half-read event of the old one is gone."""
        self.parser = SSEParser()

    def feed(self, chunk: bytes) -> None:
        for event in self.parser.feed(chunk):
            if event.id is not None and event.id.isdigit():
                self.ids.append(int(event.id))
            if event.type == "error":
                self.error_code = error_code(b'{"error": ' + event.data.encode() + b"}") or "error"
            elif self.end_event and event.type == self.end_event:
                self.end_seen = True

    def tally(self, counts: ResumeCounts) -> None:
        if self.error_code is not None:
            counts.error_events[self.error_code] += 1
        if self.error_code == "run_orphaned":
            counts.orphaned += 1
            return
        if self.end_seen:
            counts.completed += 1
        distinct = set(self.ids)
        counts.duplicated += len(self.ids) - len(distinct)
        # Gateway ids run 1, 2, 3 ... without holes: a missing number is a lost event.
        counts.lost += (max(distinct) - len(distinct)) if distinct else 0


class StreamRead:
    """What one stream delivered: events with their arrival times, end marker, errors."""

    def __init__(self, end_event: str, *, t0: float) -> None:
        self.end_event = end_event
        self.t0 = t0
        self.began = False
        self.parser = SSEParser()
        self.arrivals: list[float] = []
        self.data_events = 0
        self.bytes = 0
        self.end_seen = False
        self.announced: int | None = None
        self.error_event = False

    def feed(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        events = self.parser.feed(chunk)
        if not events:
            return
        now = time.perf_counter()
        for event in events:
            self.arrivals.append(now)
            if event.type == "error":
                self.error_event = True
            elif self.end_event and event.type == self.end_event:
                self.end_seen = True
                self.announced = _announced_count(event.data)
            else:
                self.data_events += 1

    def record(self, rec: Recorder, started: float) -> None:
        """Add this stream's figures (once its outcome is known)."""
        if self.began:
            rec.streams_started += 1
        rec.stream_bytes += self.bytes
        rec.stream_events += len(self.arrivals)
        rec.keepalive_comments += self.parser.comments
        if self.arrivals:
            first = self.arrivals[0] - self.t0
            rec.ttfe.record(first)
            rec.timeline.record("ttfe", started, first)
            for before, after in zip(self.arrivals, self.arrivals[1:], strict=False):
                rec.gaps.record(after - before)

    def error(self) -> str | None:
        """None for a complete stream, else its error kind."""
        if self.error_event:
            return "stream_error"
        if self.end_event and not self.end_seen:
            return "truncated"
        if self.announced is not None and self.announced != self.data_events:
            return "truncated"
        if self.parser.pending:
            return "truncated"
        return None


def error_code(raw: bytes) -> str | None:
    """The `code` of the gateway's JSON error envelope, if that is what `raw` is."""
    try:
        value = json.loads(raw)
        code = value["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def _announced_count(data: str) -> int | None:
    """The stub's end event carries `{"events": N}`: how many data events it sent."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    if isinstance(value, dict) and isinstance(value.get("events"), int):
        return int(value["events"])
    return None
