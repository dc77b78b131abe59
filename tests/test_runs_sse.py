"""The event-stream parser and framer (app/runs/sse.py), per the HTML standard's rules."""

from __future__ import annotations

import random

import pytest

from app.runs.entries import Entry
from app.runs.log import RunLog
from app.runs.sse import SseParser, frame, frame_whole
from tests.runs_helpers import framed_by_the_parser


def parse(*chunks: bytes) -> list[bytes]:
    parser = SseParser()
    return [event for chunk in chunks for event in parser.feed(chunk)]


def test_line_endings_lf_crlf_and_cr_are_all_line_ends() -> None:
    assert parse(b"data: a\n\ndata: b\r\n\r\ndata: c\r\rdata: d\n\r\n") == [
        b"data: a",
        b"data: b",
        b"data: c",
        b"data: d",
    ]


def test_a_crlf_split_across_chunks_is_one_line_end() -> None:
    # `\r` ends a chunk, `\n` starts the next: one line end, not an empty line.
    assert parse(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [b"data: a\ndata: b"]


def test_events_split_anywhere_come_out_whole() -> None:
    stream = b'event: token\ndata: {"t": 1}\nid: 7\nretry: 500\n\n' * 3
    whole = parse(stream)
    for size in (1, 2, 3, 5, 7):
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert parse(*chunks) == whole
    assert whole == [b'event: token\ndata: {"t": 1}\nid: 7\nretry: 500'] * 3


def test_multi_line_data_and_bare_field_names_are_kept() -> None:
    assert parse(b"data: one\ndata: two\ndata\nfoo: bar\n\n") == [
        b"data: one\ndata: two\ndata\nfoo: bar"
    ]


def test_comments_are_dropped_and_a_comment_only_block_is_no_event() -> None:
    assert parse(b": keep-alive\n\n:\n\ndata: x\n: inside\n\n") == [b"data: x"]


@pytest.mark.parametrize("split", [0, 1, 2, 3, 4])
def test_a_leading_bom_is_dropped_even_when_split(split: int) -> None:
    stream = b"\xef\xbb\xbfdata: x\n\n\xef\xbb\xbfdata: y\n\n"
    chunks = (stream[:split], stream[split:]) if split else (stream,)
    # Only the first BOM is the stream's: a later one is part of a line (a field name).
    assert parse(*chunks) == [b"data: x", b"\xef\xbb\xbfdata: y"]


def test_an_unterminated_event_is_held_not_returned() -> None:
    parser = SseParser()
    assert parser.feed(b"data: done\n\ndata: half") == [b"data: done"]
    assert parser.mid_event
    assert parser.feed(b"\n") == [] and parser.mid_event
    assert parser.feed(b"\n") == [b"data: half"] and not parser.mid_event


def test_frame_puts_the_gateway_id_last() -> None:
    assert frame(12, b"id: up-3\ndata: x") == b"id: up-3\ndata: x\nid: 12\n\n"


def test_the_log_trims_the_oldest_by_count_and_bytes() -> None:
    log = RunLog(max_events=3, max_bytes=10_000)
    for i in range(5):
        log.append(b"data: %d" % i)
    assert (log.first_seq, log.next_seq) == (3, 6)
    assert log.after(2) == [frame(3, b"data: 2"), frame(4, b"data: 3"), frame(5, b"data: 4")]
    assert log.after(4) == [frame(5, b"data: 4")]
    assert log.after(5) == []
    by_bytes = RunLog(max_events=100, max_bytes=2 * len(frame(1, b"data: 0")))
    for i in range(4):
        by_bytes.append(b"data: %d" % i)
    assert by_bytes.first_seq == 3
    assert by_bytes.bytes == 2 * len(frame(1, b"data: 0"))


def test_a_stored_entry_of_several_events_splits_after_any_position() -> None:
    events = [frame(seq, b"event: token\ndata: %d" % seq) for seq in (4, 5, 6)]
    entry = Entry(6, data=b"".join(events), first=4)
    assert entry.after(3) == b"".join(events)
    assert entry.after(4) == events[1] + events[2]
    assert entry.after(5) == events[2]
    assert entry.after(6) == b""


@pytest.mark.parametrize("seed", range(60))
def test_the_plain_stream_shortcut_parses_exactly_as_the_line_loop(seed: int) -> None:
    """Random streams (events, comment lines, extra blank lines, LF/CRLF/CR line ends, a BOM),
    cut at random: the parser with its plain-stream shortcut gives the same events as without."""
    rng = random.Random(seed)
    pieces = [rng.choice([b"", b"\xef\xbb\xbf"])]
    for _ in range(rng.randint(1, 30)):
        lines = [
            rng.choice([b"data: x", b"event: e", b"id: 3", b"data:", b"retry: 9", b": c", b":"])
            for _ in range(rng.randint(1, 4))
        ]
        end = rng.choice([b"\n", b"\n", b"\n", b"\n", b"\r\n", b"\r"])
        pieces.append(end.join(lines) + end + rng.choice([b"", b"", end]) + end)
    stream = b"".join(pieces)
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 12))))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    fast, reference = SseParser(), SseParser(shortcut=False)
    fast_events = [event for chunk in chunks for event in fast.feed(chunk)]
    assert fast_events == [event for chunk in chunks for event in reference.feed(chunk)]
    assert fast.mid_event == reference.mid_event


@pytest.mark.parametrize("seed", range(200))
def test_framing_a_whole_stream_at_once_is_exactly_the_parser_then_frame(seed: int) -> None:
    """Random whole streams (the hostile shapes above, `%` bytes, events from 1 to 1500 so
    past the made-once id lines, an unfinished last event, a small `max_event`): where
    `frame_whole` answers, its bytes and count are the parser's then `frame`'s exactly; it
    declines only off the plain shape, and answers for every plain one."""
    rng = random.Random(seed)
    lines_from = [b"data: x", b"event: e", b"id: 3", b"data:", b"retry: 9", b"data: %d %s"]
    plain = rng.random() < 0.6
    if not plain:
        lines_from += [b": c", b":", b""]
    pieces = [b"\xef\xbb\xbf" if not plain and rng.random() < 0.2 else b""]
    count = rng.choice([1, 2, 7, 51, 1023, 1024, 1025, 1500])
    for _ in range(count):
        lines = [rng.choice(lines_from) for _ in range(rng.randint(1, 4))]
        end = b"\n" if plain else rng.choice([b"\n", b"\n", b"\r\n", b"\r"])
        inner = end if plain else rng.choice([end, b"\r", b"\n"])  # mixed line ends
        pieces.append(inner.join(lines) + end + end)
    if not plain and rng.random() < 0.3:
        pieces.append(b"data: unfinished\n")
    stream = b"".join(pieces)
    limit = rng.choice([len(stream), len(stream), 12, 40])
    expected = framed_by_the_parser(stream, limit)
    got = frame_whole(stream, max_event=limit)
    if got is not None:
        assert got == expected
    else:
        assert not (plain and expected is not None), "a plain stream within the limit declined"


def test_frame_whole_declines_what_only_the_parser_may_decide() -> None:
    ok = b"data: a\n\ndata: b\n\n"
    assert frame_whole(ok, max_event=100) == (b"data: a\nid: 1\n\ndata: b\nid: 2\n\n", 2)
    for other in (
        b"data: a\n\ndata: b\n",  # unfinished last event
        b"data: a\r\n\r\n",  # CR line ends
        b"data: a\rdata: b\n\n",  # a CR line end inside an LF stream
        b"\xef\xbb\xbfdata: a\n\n",  # byte order mark
        b": hi\ndata: a\n\n",  # comment first
        b"data: a\n: hi\n\n",  # comment line
        b"data: a\n\n\ndata: b\n\n",  # an extra blank line
        b"\ndata: a\n\n",  # a blank line first
        b"\n\n",
        b"",
    ):
        assert frame_whole(other, max_event=100) is None, other
    assert frame_whole(ok, max_event=6) is None  # "data: a" is 7 bytes
    assert frame_whole(ok, max_event=7) is not None
