"""Twenty-fourth attack on resumable runs (branch attack-24, on main at 8893678): `SseParser`
counting the unfinished event as the event it would be if it ended now (`_held_now`, the `+1`
of the no-line-end path), `EventTooLarge.events` (the chunk's complete events before the
oversized one) and the pump's `_take`, which keeps them before `upstream_event_too_large`.

Every gateway runs in this process (Redis store: the test's own `shared_redis`; or the
memory store); upstreams are raw asyncio servers on loopback writing exact bytes, their
writes 50 ms apart (each one read of the gateway's).

What was tried:
- Differential: 7500 random bodies without comment lines (LF/CR/CRLF runs, CR and CRLF split
  across reads, a BOM whole, split and later in the stream, NUL, `x:` fields), `max_held`
  0..18, fed whole, at every 2-split, byte by byte and at random k-splits, `shortcut` on and
  off, against an oracle (no limit, cut at the first event over `max_held`); the bytes in
  (`held_bytes`) after every feed.
- An event of exactly `max_held` and one byte more (3 lines, LF/CRLF/CR, BOM or not) at
  every cut; one huge line growing 1..7 bytes a read after a complete line (the `+1`);
  `EventTooLarge.events` for 1..30 small events before an oversized one (complete or not,
  more after it) in 1..8 random reads.
- Comment lines: pending inside an event of exactly `max_held`, and longer than
  `max_held` between events, whole vs cut.
- The cost of the bound: an unfinished event of 2-byte lines (`max_held` 1 MiB and the
  4 MiB default) and a line arriving 3 bytes a read: tracemalloc, and the time of a 2-byte
  read with it held.
- End to end (Redis and memory stores): 4 small events then one of 4096 bytes over
  `resume_max_bytes` 4096 - 32, in one read, in many, never ending, the big one in 1 KiB
  reads; resumes from Last-Event-ID 0..6 on another request, the run counters, `uncounted`,
  the capacity slots, the budget counter. An event of exactly `max_held` then a `:` line cut
  after the `:`. `_take` of `EventTooLarge.events` taking the application over its budget
  (the cut) and meeting a failed Redis in `reserve_growth`, vs the same small events without
  the oversized one. Keep-alive comments every 20 ms into a held event of ~1.3 M short lines:
  the event loop's lag.

Held (plain tests): without comment lines every chunking gave the oracle's events and
decision (50 000+ comparisons per seed, 300+ refusals) and never more than `max_held` bytes
held (+2: a BOM's first two bytes before the stream starts); the exact event fits and one
byte more is refused at every cut; the slow huge line raises at exactly the byte that crosses
`max_held`, `held_bytes` exact at every read; `EventTooLarge.events` are exactly the small
events, once, in order, nothing partial or after. End to end: the browser gets events 1..4
then one `event: error` upstream_event_too_large (id 5) however the bytes are cut, each
resume its tail (5: 204, 6: 400), one run ended, nothing uncounted, no slot held, the budget
counter exactly `redis_cost` of the framed events; the budget cut writes only the cut
(`run_over_budget`, seq 1) and counts the first run plus the cut's cost, the browser still
getting 1..4 then the error; Redis failing in `_take` ends the run `run_store_unavailable`
after events 1..4 exactly as without the oversized event. (At 8893678^ 19 of these plain
tests fail: the events before the oversized one lost, the exact event refused.)

Breaks (all in `SseParser`, the last three predate 8893678; fixed in the same session, their
tests now plain: the unfinished event's lines are kept joined in one buffer and its last line
in another, so the held size is O(1) to know and memory is about the bytes; a comment line is
dropped as it arrives, across reads too, never held or counted):
- A pending comment line counts in the event it is not part of: an event of exactly
  `max_held` then `:` whose line end comes in the next read is refused (held 102 for 100;
  end to end 4066 for 4064: the run ends upstream_event_too_large after the first event),
  kept in one read. The attack-23 class (same stream, the decision follows the reads).
- A comment line longer than `max_held` is dropped whole in one read but held piece by piece
  and refused when cut (the events after it lost).
- Every read with a line end recounts the held lines (`_held_now`'s sums): with an event of
  ~1.38 M short lines held, a 2-byte comment read costs 40-50 ms (3.5 us with nothing held);
  end to end a comment every 20 ms kept the gateway's loop blocked ~50 ms at a time, forever
  (comments never grow the held count; each read resets the idle timeout).
- `max_held` bounds bytes, not memory: short lines or short reads hold 13-15x `max_held` in
  Python objects (~55-60 MB per run at the 4 MiB default).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import re
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import pytest

from app.keys import RUNS_KEY, UPSTREAM_KEY
from app.runs.costs import redis_cost
from app.runs.run import CUT_REASON, error_event
from app.runs.sse import EventTooLarge, SseParser, frame
from app.runs.store import RedisRunStore
from app.sessions.backend import StoreUnavailable
from tests.fake_upstream import RunningGateway, app_settings, raw_server, run_gateway
from tests.redis_server import RedisServer
from tests.runs_helpers import CSRF, error_code, event_id, read_events
from tests.test_runs_whole_attacks3 import _split_upstream

pytestmark = pytest.mark.redis_server

# -- helpers: the parser fed in pieces, and an oracle --------------------------------------

Outcome = tuple[str, list[bytes], bool]


def _feed(
    stream: bytes, cuts: Iterable[int], max_held: int | None, *, shortcut: bool
) -> tuple[Outcome, int]:
    """`stream` fed in the pieces `cuts` makes: ("ok" | "too_large", every event returned,
    including `EventTooLarge.events`, mid_event), and the most bytes ever held in
    (`held_bytes`) after a feed."""
    parser = SseParser(shortcut=shortcut, max_held=max_held)
    events: list[bytes] = []
    start = most = 0
    for cut in [*cuts, len(stream)]:
        try:
            events += parser.feed(stream[start:cut])
        except EventTooLarge as err:
            return ("too_large", events + err.events, True), most
        start = cut
        held = parser.held_bytes
        most = max(most, held)
    return ("ok", events, parser.mid_event), most


def _oracle(stream: bytes, max_held: int) -> Outcome:
    """What any chunking must give for a stream without comment lines: the events (no limit,
    the line loop) up to the first one over `max_held`; refused when one is over it or the
    unfinished last one already is (its size, as an event, only grows)."""
    events, _ = _feed(stream, [], None, shortcut=False)
    if len(stream) < 3 and b"\xef\xbb\xbf".startswith(stream):
        return events  # a BOM's first bytes: held uncounted until the stream starts
    complete = events[1]
    for at, event in enumerate(complete):
        if len(event) > max_held:
            return ("too_large", complete[:at], True)
    ended, _ = _feed(stream + b"\n\n", [], None, shortcut=False)
    if events[2] and len(ended[1]) > len(complete) and len(ended[1][-1]) > max_held:
        return ("too_large", complete, True)
    return events


def _cuts(rng: random.Random, length: int) -> list[list[int]]:
    """Every 2-split, 1-byte feeding and a few random k-splits of `length` bytes."""
    ways: list[list[int]] = [[k] for k in range(1, length)]
    ways.append(list(range(1, length)))
    for _ in range(4):
        if length > 2:
            ways.append(sorted(rng.sample(range(1, length), rng.randint(1, min(6, length - 1)))))
    return ways


# No comment line: `:` only after a field name (`x:`), never first on a line.
_PIECES = [
    b"\n",
    b"\n",
    b"\n\n",
    b"\r",
    b"\r\n",
    b"\r\r",
    b"data: ",
    b"a",
    b"bb",
    b"x:",
    b" ",
    b"\xef\xbb\xbf",
    b"\xef",
    b"\xbb\xbf",
    b"\x00",
]


@pytest.mark.parametrize("seed", range(3))
def test_every_chunking_gives_the_same_events_and_decision_without_comments(seed: int) -> None:
    """Attack: 2500 random bodies per seed (LF/CR/CRLF runs, CR and CRLF split across reads,
    a BOM and its pieces at the start and later, NUL, `x:` fields), `max_held` 0..18, fed
    whole, at every 2-split, byte by byte and at random k-splits, `shortcut` on and off.
    Measured: the events (those before an `EventTooLarge` included) and the accept/refuse
    decision vs the oracle (no limit, cut at the first event over `max_held`), and the bytes
    held after each feed. Expected: always the oracle's; held within `max_held`, but for a
    BOM's first two bytes held before the stream starts (held)."""
    rng = random.Random(seed)
    compared = refused = 0
    for _ in range(2500):
        stream = b"".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 16)))
        if rng.random() < 0.5:
            stream += b"\n\n"
        max_held = rng.randint(0, 18)
        expected = _oracle(stream, max_held)
        refused += expected[0] == "too_large"
        for shortcut in (True, False):
            for cuts in [[], *_cuts(rng, len(stream))]:
                got, most = _feed(stream, cuts, max_held, shortcut=shortcut)
                compared += 1
                assert got == expected, (stream, max_held, cuts, shortcut)
                assert most <= max_held + 2, (stream, max_held, cuts, most)
    assert compared > 50_000 and refused > 300


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_an_event_of_exactly_max_held_fits_and_one_byte_more_does_not_at_every_cut(
    line_end: bytes, bom: bytes
) -> None:
    """Attack: `data: a`, then an event of 3 lines of exactly `max_held` (LF-joined) and the
    same one byte longer, each line ending LF, CRLF or CR (CRLF split at every cut too), with
    and without a BOM, fed at every 2-split and byte by byte, `shortcut` on and off.
    Measured: the decision and the events. Expected: the exact event kept, the longer one
    refused with `data: a` handed over first, at every cut (held)."""
    for extra, fits in ((b"", True), (b"z", False)):
        big = [b"data: 1", b"event: x", b"data: " + b"y" * 40 + extra]
        max_held = len(b"\n".join(big)) - len(extra)
        stream = bom + line_end.join([b"data: a", b"", *big, b"", b""])
        expected: Outcome = (
            ("ok", [b"data: a", b"\n".join(big)], False)
            if fits
            else ("too_large", [b"data: a"], True)
        )
        ways: list[list[int]] = [[k] for k in range(1, len(stream))]
        ways.append(list(range(1, len(stream))))
        for shortcut in (True, False):
            for cuts in [[], *ways]:
                got, _ = _feed(stream, cuts, max_held, shortcut=shortcut)
                assert got == expected, (cuts, shortcut)


def test_a_huge_line_arriving_slowly_is_refused_at_the_byte_that_crosses_max_held() -> None:
    """Attack: after a complete line, one line growing by 1..7 bytes per read, no line end
    (the no-line-end path and its `+1`), `max_held` 1000. Measured: the held count after
    each read and the read that raises. Expected: held is `len(first line) + 1 + what came`,
    the raise exactly at the read taking it over 1000, and never more than 1000 bytes held
    (held)."""
    rng = random.Random(7)
    for _ in range(50):
        parser = SseParser(max_held=1000)
        first = b"data: " + b"f" * rng.randint(0, 900)
        assert parser.feed(first + rng.choice([b"\n", b"\r\n", b"\r"])) == []
        came, raised = 0, False
        while not raised:
            piece = b"g" * rng.randint(1, 7)
            try:
                parser.feed(piece)
            except EventTooLarge as err:
                raised = True
                assert err.events == []
                assert len(first) + 1 + came + len(piece) > 1000
            else:
                came += len(piece)
                assert parser.held_bytes == len(first) + 1 + came <= 1000
                held = parser.held_bytes
                assert held <= 1000


@pytest.mark.parametrize("seed", range(2))
def test_the_events_before_an_oversized_one_come_once_in_order_and_never_partial(
    seed: int,
) -> None:
    """Attack: 1..30 small events (2..12 bytes, CRLF or LF, some split), then one of 30..90
    bytes over `max_held` 20 (complete or not), then more events, in 1..8 reads at random
    cuts. Measured: everything `feed` returned before the raise plus `EventTooLarge.events`.
    Expected: exactly the small events, in order, once each, nothing of the big one or
    after it (held)."""
    rng = random.Random(seed)
    for _ in range(3000):
        small = [
            b"data: " + bytes([97 + rng.randrange(26)]) * rng.randint(0, 6)
            for _ in range(rng.randint(1, 30))
        ]
        end = rng.choice([b"\n", b"\r\n"])
        big = b"data: " + b"B" * rng.randint(30, 90)
        after = end + end + b"data: after" + end + end if rng.random() < 0.5 else b""
        stream = b"".join(event + end + end for event in small) + big + after
        cuts = sorted(set(rng.sample(range(1, len(stream)), rng.randint(0, 7))))
        got, _ = _feed(stream, cuts, 20, shortcut=rng.random() < 0.5)
        assert got == ("too_large", small, True), (stream, cuts)


# -- breaks: a pending comment line counts as part of the event ------------------------------


def test_a_comment_line_pending_inside_an_event_counts_the_same_whole_and_split() -> None:
    """Control (whole): an event of exactly `max_held` (100) bytes with a `:` comment line
    before its blank line is kept when the comment line arrives with its line end."""
    event = b"data: a\ndata: " + b"b" * 86
    assert len(event) == 100
    stream = event + b"\n:\n\n"
    for cut in (0, len(event), len(event) + 1 + 2, len(stream) - 1):
        parser = SseParser(max_held=100)
        events = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert events == [event], cut


def test_an_event_at_max_held_with_a_comment_line_cut_before_its_line_end_is_kept() -> None:
    """Attack: the event `_held_now` was made to count exactly (attack-23), with a comment
    line (`:`, as keep-alives are) before its blank line, the read boundary right after the
    comment's `:` (shortcut on and off). Measured: see the reason. Expected: kept, as whole:
    the comment is no part of the event it would be (the standard drops it)."""
    event = b"data: a\ndata: " + b"b" * 86
    stream = event + b"\n:\n\n"
    for shortcut in (True, False):
        parser = SseParser(shortcut=shortcut, max_held=100)
        cut = len(event) + 2
        assert parser.feed(stream[:cut]) + parser.feed(stream[cut:]) == [event]


def test_a_long_comment_line_gives_the_same_decision_whole_and_cut() -> None:
    """Attack: `data: a`, a 152-byte comment line between events, `data: b`, `max_held`
    100, whole vs cut inside the comment (shortcut on and off). Measured: see the reason.
    Expected: the same events either way (a comment is never an event; its bytes need not
    be held once the line is known to be one)."""
    stream = b"data: a\n\n: " + b"c" * 150 + b"\n\ndata: b\n\n"
    whole, _ = _feed(stream, [], 100, shortcut=True)
    assert whole == ("ok", [b"data: a", b"data: b"], False)
    for shortcut in (True, False):
        for cut in (11, 60, 160):
            got, _ = _feed(stream, [cut], 100, shortcut=shortcut)
            assert got == whole, (cut, shortcut, got)


# -- breaks: the cost of a held event of many short lines ------------------------------------

DEFAULT_MAX_HELD = 4 * 1024 * 1024 - 32  # resume_max_bytes' default - FRAME_OVERHEAD


def _hold_short_lines(max_held: int) -> SseParser:
    """A parser holding an unfinished event of 2-byte lines up to ~64 KiB under `max_held`,
    filled in 64 KiB reads (as `READ_CHUNK_BYTES`)."""
    parser = SseParser(max_held=max_held)
    parser.feed(b"data: x\n")
    read = b"ab\n" * (64 * 1024 // 3)
    while parser.held_bytes + 2 * len(read) < max_held:
        assert parser.feed(read) == []
    return parser


def test_a_short_read_costs_no_more_with_a_large_event_held() -> None:
    """Attack: fill the held event with short lines (4 MiB in 64 KiB reads), then 20 reads
    of a comment line (the held count never grows: the upstream can go on). Measured: the
    mean time of those reads. Expected: under 2 ms each (a few microseconds of work)."""
    parser = _hold_short_lines(DEFAULT_MAX_HELD)
    held = parser.held_bytes
    started = time.perf_counter()
    for _ in range(20):
        assert parser.feed(b":\n") == []
    mean = (time.perf_counter() - started) / 20
    assert parser.held_bytes == held
    assert mean < 0.002, f"{mean * 1000:.1f} ms per 2-byte read"


def test_the_memory_an_unfinished_event_holds_stays_near_max_held() -> None:
    """Attack: an unfinished event of `ab` lines in 64 KiB reads, and (second parser) one
    line arriving 3 bytes a read. Measured: tracemalloc's traced memory while the parser
    holds the event vs `max_held`. Expected: at most 3x `max_held` (held content plus
    reasonable overhead)."""
    max_held = 1024 * 1024 - 32
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        parser = _hold_short_lines(max_held)
        lines = tracemalloc.get_traced_memory()[0] - base
        assert parser.mid_event
        del parser
        small = max_held // 16  # a quarter of a second of reads, not seconds
        base = tracemalloc.get_traced_memory()[0]
        slow = SseParser(max_held=small)
        slow.feed(b"data: x\n")
        for i in range(small // 3 - 10):
            slow.feed(b"a%02d" % (i % 100))
        pieces = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert lines <= 3 * max_held and pieces <= 3 * small, (lines / max_held, pieces / small)


# -- end to end: small events, then one too large -------------------------------------------

MAX_BYTES = 4096
MAX_HELD = MAX_BYTES - 32
SMALL = [b"data: small %d" % i for i in range(1, 5)]
BIG = b"data: " + b"z" * MAX_BYTES


def _body(*, complete: bool) -> bytes:
    return (
        b"".join(e + b"\n\n" for e in SMALL) + BIG + (b"\n\ndata: after\n\n" if complete else b"")
    )


async def _run(
    redis: RedisServer | None, pieces: Sequence[bytes], resume_ids: Sequence[int]
) -> tuple[list[bytes], dict[int, list[bytes]], dict[str, int]]:
    """One run through the gateway (Redis store when `redis`, else memory) whose upstream
    writes `pieces` 50 ms apart; its first response's events, those of a resume from each of
    `resume_ids` on another request, and figures once it ended."""
    env: dict[str, str] = {"RUN_HEARTBEAT_SECONDS": "5"}
    if redis is not None:
        env |= {"SESSION_STORE": "redis", "REDIS_URL": redis.url}
    async with _split_upstream(list(pieces)) as url:
        settings = app_settings(url, env, resumable=True, resume_max_bytes=MAX_BYTES)
        async with run_gateway(settings) as gw:
            async with gw.client.post(
                "/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
            ) as response:
                assert response.status == 200
                run_id = response.headers["X-Run-Id"]
                first = await read_events(response)
            resumes: dict[int, list[bytes]] = {}
            for last in resume_ids:
                async with gw.client.get(
                    f"/apps/shop/runs/{run_id}", headers={"Last-Event-ID": str(last)}
                ) as resumed:
                    events = await read_events(resumed)
                    resumes[last] = [b"%d" % resumed.status, *events]
            await asyncio.sleep(0.1)
            figures = await _figures(gw, redis)
    return first, resumes, figures


async def _figures(gw: RunningGateway, redis: RedisServer | None) -> dict[str, int]:
    registry = gw.app[RUNS_KEY]
    capacity = gw.app[UPSTREAM_KEY].capacity
    figures = {
        "uncounted": registry.uncounted.get("shop"),
        "in_use": capacity.in_use + sum(s.in_use for s in capacity.apps.values()),
        "too_large": registry.counters.ended.get("upstream_event_too_large", 0),
        "ended": sum(registry.counters.ended.values()),
    }
    if redis is not None:
        store = registry.store
        assert isinstance(store, RedisRunStore)
        window = round(registry.settings.apps["shop"].resume_window_seconds * 1000)
        await registry.budget.flush()  # the ended run's cost, sent with the next flush
        figures["budget"] = await store.budget_used("shop", window_ms=window)
    return figures


def _expected_events(first: list[bytes]) -> None:
    """The first response: the small events, ids 1..n, then one error of the right code."""
    assert [e.rsplit(b"\nid: ", 1)[0] for e in first[:-1]] == SMALL
    assert [event_id(e) for e in first[:-1]] == list(range(1, len(SMALL) + 1))
    assert error_code(first[-1]) == "upstream_event_too_large"


@pytest.mark.parametrize("store", ["redis", "memory"])
@pytest.mark.parametrize("shape", ["one_read", "many_reads", "big_unfinished", "big_in_bytes"])
async def test_small_events_then_one_too_large_reach_the_browser_and_resumes(
    shared_redis: RedisServer, store: str, shape: str
) -> None:
    """Attack: 4 small events then one of 4096 bytes (over `resume_max_bytes` 4096 - 32),
    then `data: after`: in one read; each event in its own read and the big one in three;
    the big one never ending; the small events together with the big one's first bytes, its
    rest in 1 KiB reads. Redis and memory stores. Measured: the first response, resumes from
    Last-Event-ID 0..6 on another request (6: 400, past the run), the counters, `uncounted`,
    the capacity slots in use and (Redis) the application's budget counter. Expected: events
    1..4 then exactly one `event: error` upstream_event_too_large (id 5); each resume its
    tail; one run ended too large; nothing uncounted; no slot held; the budget exactly the
    run's cost (held)."""
    body = _body(complete=shape != "big_unfinished")
    head = b"".join(e + b"\n\n" for e in SMALL)
    pieces: list[bytes] = {
        "one_read": [body],
        "many_reads": [e + b"\n\n" for e in SMALL]
        + [BIG[:100], BIG[100:3000], body[len(head) + 3000 :]],
        "big_unfinished": [body],
        "big_in_bytes": [head + BIG[:10]] + [BIG[i : i + 1024] for i in range(10, len(BIG), 1024)],
    }[shape]
    redis = shared_redis if store == "redis" else None
    first, resumes, figures = await _run(redis, pieces, range(7))
    _expected_events(first)
    assert event_id(first[-1]) == len(SMALL) + 1
    for last, events in resumes.items():
        # At the error (the run's last event): 204, nothing to send; past it: 400.
        tail = first[last:]
        expected = [b"200", *tail] if tail else [b"204" if last == len(first) else b"400"]
        assert events == expected, (last, events)
    assert figures["uncounted"] == 0 and figures["in_use"] == 0, figures
    assert figures["too_large"] == figures["ended"] == 1, figures
    if redis is not None:
        framed = sum(len(e) + 2 for e in first)
        assert figures["budget"] == redis_cost(framed, len(first)), (figures, framed)


# -- end to end: a comment line pending after an event of exactly max_held -----------------

AT_MAX_HELD = b"data: a\ndata: " + b"y" * (MAX_HELD - 14)
COMMENTED = b"data: first\n\n" + AT_MAX_HELD + b"\n:\n\n"


async def _first_events(redis: RedisServer, pieces: list[bytes]) -> list[bytes]:
    first, _, figures = await _run(redis, pieces, ())
    assert figures["uncounted"] == 0 and figures["in_use"] == 0, figures
    return [e.rsplit(b"\nid: ", 1)[0] for e in first]


async def test_an_event_at_max_held_then_a_comment_line_in_one_read_is_kept(
    shared_redis: RedisServer,
) -> None:
    """Control: the body in one read: both events reach the browser (the comment dropped)."""
    assert len(AT_MAX_HELD) == MAX_HELD
    assert await _first_events(shared_redis, [COMMENTED]) == [b"data: first", AT_MAX_HELD]


async def test_an_event_at_max_held_then_a_comment_line_cut_is_kept_like_in_one_read(
    shared_redis: RedisServer,
) -> None:
    """Attack: the control's body with the upstream's write boundary right after the
    comment's `:` (a keep-alive comment inside an event). Measured: see the reason.
    Expected: the same events as in one read."""
    pieces = [COMMENTED[:-2], COMMENTED[-2:]]
    assert await _first_events(shared_redis, pieces) == [b"data: first", AT_MAX_HELD]


# -- end to end: `_take`'s budget cut and Redis failure with the error's events -------------

CUT_SMALL = b"".join(b"data: %d %s\n\n" % (i, b"s" * 1000) for i in range(1, 5))
CUT_BIG = b"data: " + b"z" * 9000  # over resume_max_bytes 8192 - 32


@contextlib.asynccontextmanager
async def _bodies_upstream(bodies: list[bytes]) -> AsyncIterator[str]:
    """An upstream answering its n-th chat with `bodies[n]`, 50 ms after its head, in one
    write (one read of the gateway's), then closing."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", request)
        if length is not None:
            await reader.readexactly(int(length.group(1)))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(bodies.pop(0))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async with raw_server(handle) as url:
        yield url


@dataclasses.dataclass
class Second:
    events: list[bytes]
    figures: dict[str, int]
    ended: dict[str, int]
    meta: dict[Any, Any]
    stream: list[tuple[Any, dict[Any, Any]]]
    cut_cost: int = 0


async def _second_run(redis: RedisServer, second: bytes, *, fail_growth: bool) -> Second:
    """A first run (`data: one`) ends and is counted, then a second whose 4 KB of events take
    the application over its 15000-byte budget (`_take`'s `reserve_growth` refuses: the cut),
    or whose `reserve_growth` meets a failed Redis (`fail_growth`)."""
    env = {"SESSION_STORE": "redis", "REDIS_URL": redis.url, "RUN_HEARTBEAT_SECONDS": "5"}
    async with _bodies_upstream([b"data: one\n\n", second]) as url:
        settings = app_settings(
            url, env, resumable=True, resume_max_bytes=8192, resume_redis_budget_bytes=15000
        )
        async with run_gateway(settings) as gw:
            registry = gw.app[RUNS_KEY]
            store = registry.store
            assert isinstance(store, RedisRunStore)
            real = store.budget_reserve
            calls = 0

            async def reserve(*args: Any, **kwargs: Any) -> tuple[bool, int]:
                nonlocal calls
                calls += 1
                if fail_growth and calls == 3:  # run 2: its admission, then its growth
                    raise StoreUnavailable("the test's Redis failed")
                return await real(*args, **kwargs)

            store.budget_reserve = reserve  # type: ignore[method-assign]
            for _ in range(2):
                async with gw.client.post(
                    "/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
                ) as response:
                    assert response.status == 200
                    run_id = response.headers["X-Run-Id"]
                    events = await read_events(response)
                await asyncio.sleep(0.1)
                await registry.budget.flush()
            assert calls == 3
            result = Second(
                [e.replace(run_id.encode(), b"RUN") for e in events],
                await _figures(gw, redis),
                dict(registry.counters.ended),
                {},
                [],
                redis_cost(len(error_event(CUT_REASON, run_id)) + 2, 1),
            )
    client = redis.client()
    prefix = f"{settings.redis_aux_prefix}run:{{{run_id}}}:"
    result.meta = client.hgetall(prefix + "m")
    result.stream = [(i, dict(f or {})) for i, f in client.xrange(prefix + "e") or []]
    client.close()
    return result


def _small_then(events: list[bytes], code: str | None) -> None:
    smalls = [e.rsplit(b"\nid: ", 1)[0] for e in events[:4]]
    assert smalls == [e for e in CUT_SMALL.split(b"\n\n") if e]
    assert [event_id(e) for e in events] == list(range(1, len(events) + 1))
    if code is None:
        assert len(events) == 4
    else:
        assert len(events) == 5 and error_code(events[4]) == code


async def test_a_budget_cut_taking_the_error_s_events_writes_only_the_cut(
    shared_redis: RedisServer,
) -> None:
    """Attack: `_take` of `EventTooLarge.events` when they take the application over its
    budget (`reserve_growth` refuses), vs the same small events without the oversized one.
    Measured: the browser's events, the run's end, the cut counter, Redis's stream and meta
    for the run, the budget counter, `uncounted`, the capacity slots. Expected: the browser
    gets events 1..4 then upstream_event_too_large (without the big one: 1..4, done); Redis
    holds only the cut (`run_over_budget`, seq 1) in both; the budget is the first run's
    plus the cut's cost; nothing uncounted, no slot held (held)."""
    big = await _second_run(shared_redis, CUT_SMALL + CUT_BIG, fail_growth=False)
    shared_redis.reset()
    small = await _second_run(shared_redis, CUT_SMALL, fail_growth=False)
    _small_then(big.events, "upstream_event_too_large")
    _small_then(small.events, None)
    assert big.ended == {"done": 1, "upstream_event_too_large": 1}
    assert small.ended == {"done": 2}
    for seen in (big, small):
        assert seen.meta[b"x"] == b"run_over_budget" and seen.meta[b"f"] == b"1", seen.meta
        assert [(f[b"f"], f[b"x"]) for _, f in seen.stream] == [(b"1", b"run_over_budget")]
        assert seen.figures["uncounted"] == 0 and seen.figures["in_use"] == 0, seen.figures
    first_cost = redis_cost(len(frame(1, b"data: one")), 1)
    assert big.figures["budget"] == first_cost + big.cut_cost, big.figures
    assert small.figures["budget"] == first_cost + small.cut_cost, small.figures


async def test_redis_failing_while_taking_the_error_s_events_ends_the_run_unavailable(
    shared_redis: RedisServer,
) -> None:
    """Attack: Redis failing in `_take`'s `reserve_growth` for `EventTooLarge.events`, vs
    for the same small events without the oversized one. Measured: the browser's events,
    the run's end, Redis, `uncounted`, the slots. Expected: both the same: events 1..4 then
    run_store_unavailable (the failure wins over the oversized event), nothing of the run in
    Redis's stream, its cost still uncounted (until its keys would expire), no slot held
    (held)."""
    big = await _second_run(shared_redis, CUT_SMALL + CUT_BIG, fail_growth=True)
    shared_redis.reset()
    small = await _second_run(shared_redis, CUT_SMALL, fail_growth=True)
    for seen in (big, small):
        _small_then(seen.events, "run_store_unavailable")
        assert seen.ended == {"done": 1, "run_store_unavailable": 1}, seen.ended
        assert seen.stream == [] and seen.figures["in_use"] == 0
    assert big.figures == small.figures and big.figures["uncounted"] > 0, big.figures


# -- end to end: a held event of short lines, then keep-alive comments ----------------------


@contextlib.asynccontextmanager
async def _comment_upstream(
    started: asyncio.Event, seconds: float, *, fill: bool
) -> AsyncIterator[str]:
    """An upstream answering `data: x`, then (`fill`) ~4 MiB of `ab` lines (the event
    unfinished, just under `resume_max_bytes`' default), then a `:` comment every 20 ms for
    `seconds` (`started` set at the first), then closing."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", request)
        if length is not None:
            await reader.readexactly(int(length.group(1)))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        writer.write(b"data: x\n")
        read = b"ab\n" * (64 * 1024 // 3)
        with contextlib.suppress(ConnectionError):
            for _ in range((DEFAULT_MAX_HELD - 200_000) // len(read) if fill else 0):
                writer.write(read)
                await writer.drain()
            await asyncio.sleep(0.5)
            started.set()
            for _ in range(round(seconds / 0.02)):
                writer.write(b":\n")
                await writer.drain()
                await asyncio.sleep(0.02)
        writer.close()

    async with raw_server(handle) as url:
        yield url


async def _worst_lag(*, fill: bool) -> float:
    """The largest lag of a 5 ms sleep over 1 s while the comments reach the gateway."""
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    async with _comment_upstream(started, 1.5, fill=fill) as url:
        settings = app_settings(url, {"RUN_HEARTBEAT_SECONDS": "5"}, resumable=True)
        async with (
            run_gateway(settings) as gw,
            gw.client.post(
                "/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
            ) as response,
        ):
            assert response.status == 200
            await asyncio.wait_for(started.wait(), 30)
            await asyncio.sleep(0.3)  # the fill's reads behind it
            worst, until = 0.0, loop.time() + 1.0
            while loop.time() < until:
                before = loop.time()
                await asyncio.sleep(0.005)
                worst = max(worst, loop.time() - before - 0.005)
            assert gw.app[RUNS_KEY].runs  # the run still pumping
            response.close()
    return worst


async def test_keep_alive_comments_in_a_small_held_event_do_not_block_the_gateway() -> None:
    """Control: the same comments with only `data: x` held: the loop's lag stays small."""
    worst = await _worst_lag(fill=False)
    assert worst < 0.02, f"the event loop blocked {worst * 1000:.0f} ms"


async def test_keep_alive_comments_in_a_large_held_event_do_not_block_the_gateway() -> None:
    """Attack: the upstream fills an unfinished event with short lines (under `max_held`, so
    the run goes on), then sends a comment every 20 ms (it never grows the held count, and
    each resets the idle timeout). Measured: the event loop's lag (a 5 ms sleep's overshoot)
    while the comments arrive. Expected: under 20 ms, as the control."""
    worst = await _worst_lag(fill=True)
    assert worst < 0.02, f"the event loop blocked {worst * 1000:.0f} ms"
