"""A small incremental Server-Sent Events parser (WHATWG HTML §9.2.6), bytes in, events out.

Only what a load generator needs: event type, data, id, and the moment each event completed.
Comments (`: keep-alive`) are counted but produce no event, as in a browser's EventSource.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Event:
    type: str
    data: str
    id: str | None


class SSEParser:
    """Feed bytes with `feed`; it returns the events completed by them (blank-line dispatch)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._type = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._has_field = False
        self.comments = 0

    def feed(self, chunk: bytes) -> list[Event]:
        buffer = self._buffer + chunk
        # A trailing CR may be the first half of CRLF: keep it until the next chunk.
        keep_cr = buffer.endswith(b"\r")
        if keep_cr:
            buffer = buffer[:-1]
        buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, rest = buffer.split(b"\n")
        self._buffer = rest + (b"\r" if keep_cr else b"")
        events: list[Event] = []
        for raw in lines:
            event = self._line(raw.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            if not self._has_field:
                return None
            event = Event(self._type or "message", "\n".join(self._data), self._id)
            self._type, self._data, self._has_field = "", [], False
            return event
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        self._has_field = True
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id":
            self._id = value
        return None

    @property
    def pending(self) -> bool:
        """True when an event was started but not terminated by a blank line (truncation)."""
        return self._has_field or bool(self._buffer.strip())
