"""Server-sent events, parsed and framed per the HTML standard's event-stream rules.

`SseParser.feed(chunk)` returns the complete events a chunk finished, each as the bytes of its
field lines joined with LF (no blank line at the end):
- Lines end with CRLF, LF or CR, also when a CRLF pair is split across two chunks.
- A UTF-8 byte order mark at the very start of the stream is dropped (also when split).
- Comment lines (starting with `:`) are dropped; a block of comments only is no event.
- Every other line (`data:`, `event:`, `id:`, `retry:`, unknown fields, a bare field name) is
  kept byte for byte, in order: the upstream's fields reach the browser unchanged.
- An event is complete at its blank line; bytes after the last one are held (`mid_event`) and
  never returned at the end of the stream (the standard discards an unterminated event).

`frame(seq, event)` is what a reader sends: the event's lines, then the gateway's `id: <seq>`
line last, then the blank line. An upstream `id:` line stays in the event, but because the
gateway's comes after it, `EventSource.lastEventId` (and `Last-Event-ID` on reconnect) is
always the gateway's sequence number.
"""

from __future__ import annotations

_BOM = b"\xef\xbb\xbf"


class SseParser:
    """Incremental splitter of an event stream into events (see the module docstring)."""

    __slots__ = ("_buffer", "_lines", "_shortcut", "_skip_lf", "_started")

    def __init__(self, *, shortcut: bool = True) -> None:
        self._buffer = b""
        self._lines: list[bytes] = []
        self._skip_lf = False
        self._started = False
        # False: never `_feed_plain` (tests compare both ways).
        self._shortcut = shortcut

    @property
    def mid_event(self) -> bool:
        """True when bytes of an unfinished event are held (an added event would corrupt it)."""
        return bool(self._buffer or self._lines)

    def feed(self, chunk: bytes) -> list[bytes]:
        if not chunk:
            return []
        if self._skip_lf:
            # The previous chunk ended with CR: a LF starting this one is the same line end.
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        data = self._buffer + chunk
        if not self._started:
            if len(data) < len(_BOM) and _BOM.startswith(data):
                self._buffer = data
                return []
            self._started = True
            if data.startswith(_BOM):
                data = data[len(_BOM) :]
        if b"\r" in data:
            self._skip_lf = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        elif (
            self._shortcut
            and b"\n\n\n" not in data
            and b"\n:" not in data
            and data[:1] not in (b"\n", b":")
            and not self._lines
        ):
            return self._feed_plain(data)
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        events: list[bytes] = []
        held = self._lines
        for line in lines:
            if line:
                if line[:1] != b":":
                    held.append(line)
            elif held:
                events.append(b"\n".join(held))
                held = []
        self._lines = held
        return events

    def _feed_plain(self, data: bytes) -> list[bytes]:
        """`feed` for what most agents send: LF line ends, no comment line, no blank line
        beyond the one ending each event, no line held from before. Then every event is
        exactly a piece between two `\n\n` (its lines joined with LF): one split instead of
        one step per line, the same result."""
        events = data.split(b"\n\n")
        rest = events.pop()
        if rest:
            lines = rest.split(b"\n")
            self._buffer = lines.pop()
            self._lines = lines
        else:
            self._buffer = b""
        return events


def frame(seq: int, event: bytes) -> bytes:
    """`event` as sent to a browser: its lines, the gateway's `id:` last, a blank line."""
    return b"%s\nid: %d\n\n" % (event, seq)
