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

import itertools
import re

_BOM = b"\xef\xbb\xbf"
# A comment line or a blank line beyond the one ending an event: not the plain shape
# (`_feed_plain`). One regex pass: `b"\n:" in` and `b"\n\n\n" in` took 10 + 7 us on an 11 KB
# burst of 51 events (the pattern's first byte on every line), this 4.7 us (timeit).
_NOT_PLAIN = re.compile(rb"\n(?::|\n\n)")
# Where the events of the plain shape end. Split with a regex: `bytes.split(b"\n\n")` took
# 10.6 us on an 11 KB burst, this 7.2 us (its search skips on the first byte).
_EVENT_END = re.compile(rb"\n\n")
# A held last line this long, ended by a read, moves into the unfinished event in place rather
# than being joined with the read: the read that completes an event of `max_held` then peaks at
# about 2x its size, not 3x (the joined read, its split line and the event at once: attack-25).
# Shorter held lines keep the join, so a read can still take `_feed_plain`.
_MOVED_LINE_BYTES = 64 * 1024
# What `frame` adds to an event at most: `\nid: <seq>\n\n` with a 64-bit sequence number.
FRAME_OVERHEAD = 32


class EventTooLarge(Exception):
    """The upstream's current event outgrew the parser's `max_held` bytes. `events`: the
    complete events the same chunk brought before it (theirs to keep: attack-23 found them
    lost when they arrived in the same read as the oversized one)."""

    def __init__(self, message: str, events: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.events: list[bytes] = events or []


class SseParser:
    """Incremental splitter of an event stream into events (see the module docstring).

    Linear time and memory close to the bytes held: the unfinished event's complete lines are
    kept joined in one buffer (`_event`, each line followed by its LF), its last line in
    another (`_line`), so a read costs its own length whatever is held, and an event of many
    short lines or short reads holds about its size (attack-24: a list of pieces held 13-15x
    the bytes, and each read re-summed them: 50 ms per read with 4 MiB held). A comment line
    is dropped as it arrives, also across reads: never held, never counted. With `max_held`,
    the unfinished event (as it would be if it ended now) and each completed event stay
    within it: past it `feed` raises `EventTooLarge` (the caller ends the stream), the same
    decision wherever the reads cut the stream."""

    __slots__ = (
        "_comment",
        "_event",
        "_line",
        "_max_held",
        "_shortcut",
        "_skip_lf",
        "_started",
    )

    def __init__(self, *, shortcut: bool = True, max_held: int | None = None) -> None:
        # The unfinished event's complete lines, each followed by LF (no comment line).
        self._event = bytearray()
        # The unfinished last line (no line end, no CR; before the stream's first bytes are
        # known not to be a byte order mark, those bytes).
        self._line = bytearray()
        # In a comment line whose line end has not come yet: its bytes are dropped.
        self._comment = False
        self._skip_lf = False
        self._started = False
        # False: never `_feed_plain` (tests compare both ways).
        self._shortcut = shortcut
        self._max_held = max_held

    @property
    def mid_event(self) -> bool:
        """True when bytes of an unfinished event are held (an added event would corrupt it)."""
        return bool(self._line or self._event)

    @property
    def held_bytes(self) -> int:
        """The size of the unfinished event held, as it would be if it ended now."""
        event, line = len(self._event), len(self._line)
        return event + line if line or not event else event - 1

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events `chunk` completed; raises `EventTooLarge` past `max_held`."""
        if not chunk:
            return []
        if self._skip_lf:
            # The previous chunk ended with CR: a LF starting this one is the same line end.
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        if not self._started:
            data = bytes(self._line) + chunk
            if len(data) < len(_BOM) and _BOM.startswith(data):
                self._line = bytearray(data)
                return []
            self._started = True
            self._line = bytearray()
            chunk = data[len(_BOM) :] if data.startswith(_BOM) else data
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._comment:  # the rest of a comment line, up to its line end: dropped
            end = chunk.find(b"\n")
            if end < 0:
                return []
            self._comment = False
            chunk = chunk[end + 1 :]
            if not chunk:
                return []
        if b"\n" not in chunk:
            # No line end: only the new bytes are scanned, the line grows by them.
            if not self._line and chunk[:1] == b":":
                self._comment = True
                return []
            self._line += chunk
            self._check(self.held_bytes)
            return []
        if len(self._line) >= _MOVED_LINE_BYTES:
            data = self._end_held_line(chunk)
        else:
            data = b"".join((self._line, chunk)) if self._line else chunk
            self._line = bytearray()
        if (
            self._shortcut
            and _NOT_PLAIN.search(data) is None
            and data[:1] not in (b"\n", b":")
            and not self._event
        ):
            events = self._feed_plain(data)
        else:
            events = self._feed_lines(data)
        if self._max_held is None:
            return events
        if events and max(map(len, events)) > self._max_held:
            at = next(i for i, event in enumerate(events) if len(event) > self._max_held)
            self._check(len(events[at]), events[:at])
        self._check(self.held_bytes, events)
        return events

    def _check(self, size: int, events: list[bytes] | None = None) -> None:
        if self._max_held is not None and size > self._max_held:
            raise EventTooLarge(f"an upstream event outgrew {self._max_held} bytes", events)

    def _feed_lines(self, data: bytes) -> list[bytes]:
        """`feed` for `data` (LF line ends only): one step per line."""
        lines = data.split(b"\n")
        self._hold_last_line(lines.pop())
        events: list[bytes] = []
        # The event's lines from earlier reads (only this name holds them: released as soon
        # as they are copied into their event, one copy, so a read peaks at about 2x
        # `max_held`, not 3x: attack-25).
        before, self._event = self._event, bytearray()
        held: list[bytes] = []  # its lines from this one
        for line in lines:
            if line:
                if line[:1] != b":":
                    held.append(line)
            elif held or before:
                if not before:
                    event = b"\n".join(held)
                elif held:
                    event = b"".join((before, b"\n".join(held)))
                else:
                    del before[-1]
                    event = bytes(before)
                before = bytearray()
                events.append(event)
                held = []
        if held:
            before += b"\n".join(held)
            before.append(0x0A)
        self._event = before
        return events

    def _end_held_line(self, chunk: bytes) -> bytes:
        """Ends the held last line with `chunk`'s first line (`chunk` has a line end) and moves
        it into the unfinished event without a copy of the read; the rest of `chunk`."""
        end = chunk.index(b"\n")
        line, self._line = self._line, bytearray()
        line += chunk[:end]
        if self._event:
            self._event += line
        else:
            self._event = line
        del line
        self._event.append(0x0A)
        return chunk[end + 1 :]

    def _hold_last_line(self, rest: bytes) -> None:
        """The unfinished last line of a read: held, or dropped as a comment line."""
        if rest[:1] == b":":
            self._comment = True
        elif rest:
            self._line = bytearray(rest)

    def _feed_plain(self, data: bytes) -> list[bytes]:
        """`feed` for what most agents send: LF line ends, no comment line, no blank line
        beyond the one ending each event, no line held from before. Then every event is
        exactly a piece between two `\n\n` (its lines joined with LF): one split instead of
        one step per line, the same result."""
        events = data.split(b"\n\n")
        rest = events.pop()
        if rest:
            cut = rest.rfind(b"\n") + 1
            if cut:
                self._event = bytearray(rest[:cut])
            self._hold_last_line(rest[cut:])
        return events


FRAME = b"%s\nid: %d\n\n"
"""`FRAME % (event, seq)` is `frame(seq, event)` (for loops that frame many)."""


def frame(seq: int, event: bytes) -> bytes:
    """`event` as sent to a browser: its lines, the gateway's `id:` last, a blank line."""
    return FRAME % (event, seq)


# What `frame` adds after the events 1, 2, ... of a run (`frame_whole`), made once.
_ID_LINES = [b"\nid: %d\n\n" % seq for seq in range(1, 1025)]


def _id_lines(count: int) -> list[bytes]:
    if count <= len(_ID_LINES):
        return _ID_LINES[:count]
    return _ID_LINES + [b"\nid: %d\n\n" % seq for seq in range(len(_ID_LINES) + 1, count + 1)]


def frame_whole(stream: bytes, *, max_event: int) -> tuple[bytes, int] | None:
    """A whole event stream (all of it, ended) of the plain shape (`SseParser._feed_plain`'s:
    LF line ends, no byte order mark, no comment line, no blank line beyond the one ending each
    event) whose last event is complete: its events framed from sequence number 1 and joined,
    and their count; exactly `b"".join(frame(seq, e) for seq, e in enumerate(events, 1))` for
    the events `SseParser().feed(stream)` returns. None for any other shape, or an event over
    `max_event` bytes (the parser's `max_held`): then the caller takes the parser's way.

    For an agent's answer that arrived whole: one split and one join in C instead of a step per
    event (an 11 KB burst of 51 events: 18 us instead of 38 us for the parser and the framing,
    timeit, session 11)."""
    if (
        len(stream) < 3
        or stream[-2:] != b"\n\n"
        or stream[:1] in (b"\n", b":", _BOM[:1])
        or b"\r" in stream
        or _NOT_PLAIN.search(stream) is not None
    ):
        return None
    events = _EVENT_END.split(stream)
    events.pop()  # the empty piece after the last event's end
    if len(stream) > max_event and max(map(len, events)) > max_event:
        return None
    count = len(events)
    parts: list[bytes] = [b""] * (2 * count)
    parts[0::2] = events
    parts[1::2] = _id_lines(count)
    return b"".join(parts), count


def frame_stream(stream: bytes, *, max_held: int) -> tuple[bytes, int] | None:
    """A whole event stream of any shape, framed from 1 and joined, and its event count:
    `frame_whole`'s answer, or the parser's (the same bytes, slower). None when an event is
    over `max_held` bytes or the last one is unfinished."""
    framed = frame_whole(stream, max_event=max_held)
    if framed is not None:
        return framed
    parser = SseParser(max_held=max_held)
    try:
        events = parser.feed(stream)
    except EventTooLarge:
        return None
    if parser.mid_event:
        return None
    return b"".join([FRAME % pair for pair in zip(events, itertools.count(1))]), len(events)
