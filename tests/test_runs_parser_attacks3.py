"""Twenty-sixth attack on resumable runs (branch attack-26, at 09731d0): `SseParser.feed`
moving a held last line of `_MOVED_LINE_BYTES` (64 KiB) or more into the unfinished event in
place when a read ends it (`_end_held_line`), instead of joining it with the read.

What was tried:
- Differential against attack-25's byte-by-byte `_Reference` (tests/test_runs_parser_attacks2)
  with `_MOVED_LINE_BYTES` patched to 3, 4 and 7: streams whose lines are one byte under, at
  and over the threshold (the event's first line or a later one; LF, CR, CRLF ends; a BOM; a
  comment line right after the long line; more events after it; a lone CR ending the stream),
  fed at EVERY 2-split and 3-split (equal cuts: empty chunks), byte by byte, shortcut on and
  off, `max_held` None, 0 and the first event's size -1/0/+1; `held_bytes`, `mid_event` and
  the event count checked after every feed, `EventTooLarge.events` with the decision.
  `_end_held_line` calls are counted so the moved path is known to run (tens of thousands).
- The same at the real threshold: lines of 63,999 / 65,535 / 65,536 / 65,537 bytes, cut into
  64 KiB reads and at chosen places (one byte before the line end, exactly at it, a CR ending
  one read and its LF starting the next, the blank line alone, byte-sized reads around the
  end), `max_held` at and around the event's size.
- Memory (tracemalloc peak of the read that completes an event of ~`max_held`, over the empty
  parser, as attack-25's `_completing_peak`): in the gateway's read size (64 KiB), the long
  line first or after a short line, CRLF, CR ends (a CR ending the read), earlier short lines
  of 10% of the event (5-90% measured by hand: 2.13x each); and reads larger than 64 KiB.
- Time: events of many long lines (each moved) in 64 KiB reads: 1 vs 4 MiB.
- End to end (memory store): an upstream writing a 70,000-byte line in pieces ended by a lone
  CR write (a comment after it), exactly at a write's end (after a BOM), and by a write whose
  next line takes the event over the limit; the moved path counted in the gateway's parser.

Held: every differential comparison (~367 000 chunkings, ~58 000 `_end_held_line` calls,
refusals included) gave the reference's events, decision, `EventTooLarge.events`, and state
after every feed; the real-size cuts too. The same tests catch 5 of 5 hand-made mutants of
`_end_held_line` (its LF not appended, the read's piece of the line dropped, the rest started
at the LF, the earlier lines overwritten, the held line not cleared), at the small threshold
and at the real sizes alike. With 64 KiB reads the completing read peaks at 2.06x `max_held`
(long line first) and 2.13x (after a short line: `_event += line` is exact, then the `append`
of its LF over-allocates by 1/8), CRLF and CR alike (2.9-3.0x with the threshold patched out
of reach, the join as before). Time linear (3 events of 65,537-byte lines in 64 KiB reads:
1 MiB each 6.5 ms, 4 MiB each 29 ms). End to end the browser got the reference's events.

Broke (memory, not correctness; strict xfails below):
- The completing read larger than 64 KiB: one read bringing the rest of a held line of 65,535
  bytes (one under the threshold: the old join) and the blank line peaks 3.00x max_held, at
  65,536 bytes 2.13x; a CRLF read of the whole ~1 MiB event 3.00x (the two `replace` copies
  then the split), and after a moved 64 KiB line 3.06x (the replaced read is still alive while
  the line grows). The gateway reads at most 64 KiB (`READ_CHUNK_BYTES`) except the body that
  had all arrived before the run started (`first`, bounded by aiohttp's buffer: ~128 KiB and
  a receive), so this is the parser's own claim, not a gateway figure.
- A 64 KiB read bringing the blank line of a held ~max_held event (long line) AND 7,000 small
  events: 2.57x at max_held 1 MiB (2.24x at the gateway's default 4 MiB): the event's copy
  (2.13x) and the read's split lines (0.32x fed to an empty parser) at once. Additive (~5x the
  read's bytes), not a multiple of max_held.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from app.runs import sse
from app.runs.sse import EventTooLarge, SseParser
from tests.fake_upstream import app_settings
from tests.runs_helpers import event_id, events_of_one_run
from tests.test_runs_parser_attacks2 import _check_chunks, _Reference
from tests.test_runs_parser_attacks2 import _completing_peak as completing_peak
from tests.test_runs_whole_attacks3 import _split_upstream

_BOM = b"\xef\xbb\xbf"
KIB = 1024
MIB = 1024 * KIB


@pytest.fixture
def moved_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts `_end_held_line` calls (the moved path), the method itself unchanged."""
    calls = [0]
    real: Callable[[SseParser, bytes], bytes] = SseParser._end_held_line

    def counting(self: SseParser, chunk: bytes) -> bytes:
        calls[0] += 1
        return real(self, chunk)

    monkeypatch.setattr(SseParser, "_end_held_line", counting)
    yield calls


def _compare(
    stream: bytes,
    ways: Sequence[Sequence[int]],
    max_helds: Sequence[int | None],
) -> int:
    """Every chunking in `ways` x `max_helds` x shortcut on/off against the reference (state
    checked after each feed); the number compared."""
    ref = _Reference(stream)
    compared = 0
    for max_held in max_helds:
        expected = ref.outcome(max_held)
        for shortcut in (True, False):
            for cuts in ways:
                got = _check_chunks(stream, cuts, max_held, ref, shortcut=shortcut)
                assert got == expected, (stream, max_held, list(cuts), shortcut)
                compared += 1
    return compared


def _all_ways(length: int) -> list[list[int]]:
    """Whole, every 2-split, every 3-split (equal cuts: an empty chunk), byte by byte."""
    ways = [[i, j] for i in range(length + 1) for j in range(i, length + 1)]
    return [[], *ways, list(range(length + 1))]


def _max_helds(stream: bytes) -> list[int | None]:
    events = _Reference(stream).events
    size = len(events[0]) if events else 4
    return [None, 0, size - 1, size, size + 1]


# -- the moved path at a small threshold, every cut ------------------------------------------


def _threshold_streams(threshold: int) -> list[bytes]:
    """Lines one under, at and over `threshold` bytes, in the shapes of the module docstring."""
    streams: list[bytes] = []
    for n in (threshold - 1, threshold, threshold + 1):
        long = b"d" + b"x" * (n - 1)
        for end in (b"\n", b"\r", b"\r\n"):
            streams += [
                long + end + end + b"e\n\n",  # the long line first, more events after
                b"a:1" + end + long + end + end,  # a later line
                long + end + b":c" + end + end + b"z" + end,  # a comment right after it
                _BOM + long + end + end,
                long + end + long + end + end,  # two long lines, each moved
                b"a" + end + long + end + b"b" + end + end + b"c" + end + end,
                long + end + b"\r",  # a lone CR ending the stream
            ]
    return streams


@pytest.mark.parametrize("threshold", [3, 4, 7])
def test_every_chunking_at_a_small_threshold_matches_the_reference(
    monkeypatch: pytest.MonkeyPatch, moved_calls: list[int], threshold: int
) -> None:
    """Attack: `_MOVED_LINE_BYTES` patched to `threshold`, lines one under, at and over it,
    fed at every 2-split and 3-split and byte by byte, shortcut on and off, `max_held` None, 0
    and the first event's size -1/0/+1. Expected: the reference's events, decision and state
    after every feed; the moved path taken many times."""
    monkeypatch.setattr(sse, "_MOVED_LINE_BYTES", threshold)
    compared = 0
    for stream in _threshold_streams(threshold):
        compared += _compare(stream, _all_ways(len(stream)), _max_helds(stream))
    assert compared > 40_000 and moved_calls[0] > 6_000, (compared, moved_calls[0])


@pytest.mark.parametrize("seed", range(2))
def test_random_streams_of_long_and_short_lines_match_the_reference(
    monkeypatch: pytest.MonkeyPatch, moved_calls: list[int], seed: int
) -> None:
    """Attack: `_MOVED_LINE_BYTES` 4, 300 random streams of lines of 1-6 bytes (so around it),
    comment lines, LF/CR/CRLF, BOM, blank runs; every 2-split, byte by byte and 6 random
    k-splits with empty chunks; `max_held` None, 0, the first event's size -1/0/+1."""
    monkeypatch.setattr(sse, "_MOVED_LINE_BYTES", 4)
    rng = random.Random(2600 + seed)
    pieces = [b"\n", b"\r", b"\r\n", b"\n\n", b"\r\r", b"\r\n\r\n", b":", b":c\n"]
    compared = 0
    for _ in range(300):
        parts = [rng.choice([b"", _BOM, b":x\n"])]
        for _ in range(rng.randint(1, 6)):
            parts.append(b"d" * rng.randint(1, 6))
            parts.append(rng.choice(pieces))
        stream = b"".join(parts) + rng.choice([b"", b"\n\n", b"\r"])
        n = len(stream)
        ways = [[i] for i in range(n + 1)] + [list(range(n + 1))]
        ways += [sorted(rng.randint(0, n) for _ in range(rng.randint(2, 6))) for _ in range(6)]
        compared += _compare(stream, ways, _max_helds(stream))
    assert compared > 80_000 and moved_calls[0] > 15_000, (compared, moved_calls[0])


# -- the real threshold, chosen cuts ----------------------------------------------------------


def _real_cuts(stream: bytes, end: int) -> list[list[int]]:
    """64 KiB reads; the line end `end` (its first byte) at, one before and after a cut; a
    CR/LF pair split; the rest byte by byte near the end."""
    reads = list(range(64 * KIB, len(stream), 64 * KIB))  # 65,537: the read ending the line
    # brings its last byte (`_end_held_line`'s `chunk[:end]` not empty)
    near = [end - 1, end, end + 1, end + 2, end + 3]
    ways: list[list[int]] = [[], reads, [end], [end + 1], [end - 1]]
    for mark in near:
        ways.append(sorted({*[r for r in reads if r < mark], mark}))
        ways.append([mark, mark])  # an empty chunk at the cut
    ways.append([r for r in reads if r < end - 2] + list(range(end - 2, min(end + 8, len(stream)))))
    ways.append([end - 64 * KIB, end, end + 1])
    return [[c for c in way if 0 <= c <= len(stream)] for way in ways]


@pytest.mark.parametrize("size", [63_999, 65_535, 65_536, 65_537])
@pytest.mark.parametrize("end", [b"\n", b"\r", b"\r\n"])
def test_lines_around_64_kib_match_the_reference(size: int, end: bytes) -> None:
    """Attack: a line of `size` bytes (the event's first, then a later one after a short line
    and a BOM, then followed by a comment line and a second event), ended by `end`, cut in 64
    KiB reads and at the line end (see `_real_cuts`); `max_held` None, the first event's size
    -1/0/+1. Expected: the reference's events, decision and state after every feed."""
    long = b"data: " + b"y" * (size - 6)
    shapes = [
        (b"", long + end + end + b"data: e" + end + end),
        (_BOM + b"id: 1" + end, long + end + b":c" + end + end + b"data: z" + end + end),
    ]
    for head, rest in shapes:
        stream = head + rest
        ref = _Reference(stream)
        first = len(ref.events[0])
        assert first >= size
        at = len(head) + size
        for max_held in (None, first - 1, first, first + 1):
            expected = ref.outcome(max_held)
            for cuts in _real_cuts(stream, at):
                for shortcut in (True, False):
                    got = _check_chunks(stream, cuts, max_held, ref, shortcut=shortcut)
                    assert got == expected, (size, end, head, max_held, cuts, shortcut)


def test_a_read_ending_at_a_moved_line_s_end_holds_the_right_state() -> None:
    """Attack: a 65,536-byte line held, then reads of exactly its CR, its LF (the pair split),
    an empty read, a comment line, then its blank line with a second event and a partial
    third; then a line of 65,535 bytes after `a` completed by one byte with `max_held` at the
    event's size and one under. Expected (known answers): held size 65,536 while the line is
    unfinished and once ended, the event returned once, the second event, the third held (8
    bytes); the event kept at its size, refused one over (no events before it)."""
    long = b"data: " + b"q" * (65_536 - 6)
    parser = SseParser(max_held=65_536)
    assert parser.feed(long[:40_000]) == [] and parser.feed(long[40_000:]) == []
    assert (parser.held_bytes, parser.mid_event) == (65_536, True)
    assert parser.feed(b"\r") == [] and parser.held_bytes == 65_536
    assert parser.feed(b"\n") == [] and parser.held_bytes == 65_536
    assert parser.feed(b"") == [] and parser.feed(b":c\r\n") == []
    assert parser.feed(b"\r\ndata: 2\n\ndata: 3,") == [long, b"data: 2"]
    assert (parser.held_bytes, parser.mid_event) == (8, True)
    for max_held, events in ((65_538, [b"a\n" + long, b"data: ok"]), (65_537, None)):
        parser = SseParser(max_held=max_held)
        assert parser.feed(b"a\n" + long[:-1]) == []
        assert parser.held_bytes == 65_537 and parser.feed(b"") == []
        if events is None:
            with pytest.raises(EventTooLarge) as info:
                parser.feed(long[-1:] + b"\n\ndata: ok\n\n")
            assert info.value.events == []
        else:
            assert parser.feed(long[-1:] + b"\n\ndata: ok\n\n") == events


# -- memory: the read that completes a held event --------------------------------------------


def _completing_peak(setup: Sequence[bytes], final: bytes, max_held: int) -> float:
    """attack-25's measure (tests/test_runs_parser_attacks2.py), the event checked whole."""
    peak, size = completing_peak(setup, final, max_held)
    assert size > max_held - 64 * KIB
    return peak


def _reads(data: bytes, size: int = 64 * KIB) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


BIG = b"data: " + b"x" * (MIB - 100)


@pytest.mark.parametrize(
    "shape", ["long_first", "after_short", "crlf", "cr_end", "last_64k_read", "lines_10"]
)
def test_a_completing_64_kib_read_peaks_at_most_about_twice_max_held(shape: str) -> None:
    """Attack: an event of ~1 MiB (`max_held` 1 MiB) whose long line arrived in 64 KiB reads
    (the gateway's read size), then the read that completes it: the blank line after the line
    as the event's first; after a short first line; CRLF ends; CR ends (`\\r\\r`, the read
    ending with a CR); the line's last ~64 KiB and the blank line; after short lines of 10%
    of the event. Measured: 2.06x, 2.13x (the others; 2.9-3.0x with every line joined, as
    before 09731d0, except the first shape). Expected: at most 2.2x."""
    crlf = shape == "crlf"
    head = b"" if shape == "long_first" else (b"data: x\r\n" if crlf else b"data: x\n")
    line = BIG
    if shape == "lines_10":
        head = b"data: ab\n" * (MIB // 90)
        line = BIG[: MIB - len(head) - 100]
    setup, final = [*_reads(head), *_reads(line)], b"\r\n\r\n" if crlf else b"\n\n"
    if shape == "cr_end":
        final = b"\r\r"  # the event's CR line ends, the last one ending the read
    elif shape == "last_64k_read":
        setup, final = [head, *_reads(line[: -60 * KIB])], line[-60 * KIB :] + b"\n\n"
    peak = _completing_peak([s for s in setup if s], final, MIB)
    assert peak <= 2.2, f"peak {peak:.3f}x max_held"


@pytest.mark.xfail(
    strict=True,
    reason="a 64 KiB read with the blank line of a held ~1 MiB event and 7,000 small events: "
    "peak 2.57x max_held 1 MiB (2.24x at 4 MiB); the same read into an empty parser 0.32x",
)
def test_a_completing_read_full_of_small_events_peaks_at_most_about_twice_max_held() -> None:
    """Attack: an event of ~1 MiB (long line in 64 KiB reads) held, then one 63,002-byte read:
    its blank line and 7,000 events `data: 1`. Measured: 2.57x (the held event's copy and the
    read's split lines at once). Expected: at most 2.2x."""
    final = b"\n\n" + b"data: 1\n\n" * 7000
    peak = _completing_peak([b"data: x\n", *_reads(BIG)], final, MIB)
    assert peak <= 2.2, f"peak {peak:.3f}x max_held"


@pytest.mark.parametrize("held", [65_536, 200_000])
def test_a_large_read_ending_a_moved_line_peaks_about_twice(held: int) -> None:
    """Control for the xfail below: a held line of 64 KiB or more (moved), then ONE read with
    the rest of the ~1 MiB line and the blank line. Measured 2.13x. Expected: at most 2.2x."""
    peak = _completing_peak([b"data: x\n", BIG[:held]], BIG[held:] + b"\n\n", MIB)
    assert peak <= 2.2, f"peak {peak:.3f}x max_held"


@pytest.mark.xfail(
    strict=True,
    reason="reads over 64 KiB (not the gateway's): a 65,535-byte held line then one read of "
    "the rest of a 1 MiB event: 3.00x max_held (65,536: 2.13x); a CRLF read of the whole "
    "event 3.00x; a CRLF read after a moved 64 KiB line 3.06x",
)
@pytest.mark.parametrize("shape", ["just_under", "crlf_whole", "crlf_after_moved"])
def test_a_large_completing_read_peaks_at_most_about_twice_max_held(shape: str) -> None:
    """Attack: the read completing a ~1 MiB event brings most of it: the rest of a held line
    one byte under the threshold (joined, not moved); the whole event with CRLF ends; the rest
    of a moved 64 KiB line with CRLF ends. Expected (the change's claim): at most 2.2x."""
    if shape == "just_under":
        setup, final = [b"data: x\n", BIG[:65_535]], BIG[65_535:] + b"\n\n"
    elif shape == "crlf_whole":
        setup, final = [b"data: x\r\n"], BIG + b"\r\n\r\n"
    else:
        setup, final = [b"data: x\r\n", BIG[:70_000]], BIG[70_000:] + b"\r\n\r\n"
    peak = _completing_peak(setup, final, MIB)
    assert peak <= 2.2, f"peak {peak:.3f}x max_held"


def test_events_of_many_moved_lines_cost_linear_time() -> None:
    """Attack: events of 65,537-byte lines (each moved into its event when the next read ends
    it) in 64 KiB reads, 1 MiB vs 4 MiB of them. Expected: 4x the bytes under 8x the time,
    each under 2 s, the events whole."""
    line = b"data: " + b"m" * (65_537 - 6)

    def run(count: int) -> float:
        event = b"\n".join([line] * count)
        reads = _reads(event + b"\n\n") * 3
        parser = SseParser(max_held=len(event))
        started = time.perf_counter()
        events = [e for r in reads for e in parser.feed(r)]
        elapsed = time.perf_counter() - started
        assert events == [event] * 3
        return elapsed

    small, large = min(run(16) for _ in range(2)), min(run(64) for _ in range(2))
    assert large < 8 * small + 0.02 and large < 2, (small, large)


# -- end to end ---------------------------------------------------------------------------


LONG_LINE = b"data: " + b"y" * (70_000 - 6)
_HEAD = b"data: a\n\nid: 7\n" + LONG_LINE[:40_000]
E2E = [
    # a CR write ending the long line, its LF in the next write with a comment and the blank
    [_HEAD, LONG_LINE[40_000:], b"\r", b"\n: c\r\n\r\n", b"data: b\n\n"],
    # the long line first in its event, ended exactly at a write's end, then two events
    [_BOM + LONG_LINE[:65_536], LONG_LINE[65_536:] + b"\n", b"\ndata: c\n\ndata: d\n\n"],
    # the read ending the long line brings a line that takes its event over the limit
    [_HEAD, LONG_LINE[40_000:], b"\rdata: more\r\n\r\n", b"data: b\n\n"],
]


@pytest.mark.parametrize("case", ["cr_split", "at_write_end", "too_large"])
async def test_long_lines_through_the_gateway_give_the_reference_s_events(
    moved_calls: list[int], case: str
) -> None:
    """Attack: the upstream writes a 70,000-byte line in pieces (each piece one read or two),
    ended by a lone CR write, or exactly at a write's end, or by a write whose next line takes
    the event 7 bytes over the limit (`resume_max_bytes` 70,042, else 100,000). Expected: the
    moved path taken in the gateway's parser; the browser gets exactly the
    reference's events (those before the one too large, then the run's error event), ids
    1..n."""
    pieces = E2E[["cr_split", "at_write_end", "too_large"].index(case)]
    stream = b"".join(pieces)
    limit = 70_042 if case == "too_large" else 100_000
    status, expected, _ = _Reference(stream).outcome(limit - sse.FRAME_OVERHEAD)
    assert (status == "too_large") == (case == "too_large") and expected
    async with _split_upstream(pieces) as url:
        settings = app_settings(url, {}, resumable=True, resume_max_bytes=limit)
        got = await events_of_one_run(settings)
    errors = [e for e in got if e.startswith(b"event: error\n")]
    assert len(errors) == (case == "too_large")
    assert all(b'"upstream_event_too_large"' in e for e in errors)
    got = [e for e in got if e not in errors]
    assert [e.rsplit(b"\nid: ", 1)[0] for e in got] == expected
    assert [event_id(e) for e in got] == list(range(1, len(expected) + 1))
    assert moved_calls[0] >= 1
