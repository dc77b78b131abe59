"""Resumable runs stay within the application's `resume_max_bytes` against a hostile upstream
(docs/resumable-streams.md): an unfinished event is held up to it, in linear time, then the run
ends with `upstream_event_too_large` and the upstream is cut; the run log and the follower's
mirror never keep more than it, not even of one event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.runs.log import RunLog
from app.runs.sse import EventTooLarge, SseParser
from tests.fake_upstream import RunningGateway, app_settings, run_gateway
from tests.runs_helpers import SseUpstream

CSRF = {"X-CSRF": "1"}
CHAT = "/apps/shop/agent/chat"
MAX_BYTES = 1024 * 1024  # the application's resume_max_bytes


async def _replay_tail(gw: RunningGateway, run_id: str) -> bytes:
    """The run's stream from a resume, once it has ended."""
    async with gw.client.get(f"/apps/shop/runs/{run_id}") as replay:
        body: bytes = await replay.read()
    return body


class EndlessLineUpstream(SseUpstream):
    """A hostile upstream: one event whose `data:` line never ends, 256 KiB per write."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.cut = asyncio.Event()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        piece = b"x" * (256 * 1024)
        try:
            await response.write(b"data: ")
            while self.sent < self.total:
                await response.write(piece)
                self.sent += len(piece)
            await asyncio.sleep(10)  # then hold the (still unfinished) event open
        except (ConnectionError, asyncio.CancelledError):
            self.cut.set()
            raise
        return response


@pytest.fixture
async def endless() -> AsyncIterator[tuple[EndlessLineUpstream, TestServer]]:
    upstream = EndlessLineUpstream(total=32 * MAX_BYTES)
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield upstream, server
    finally:
        await server.close()


async def test_an_unfinished_event_beyond_resume_max_bytes_ends_the_run_and_cuts_the_upstream(
    endless: tuple[EndlessLineUpstream, TestServer],
) -> None:
    """docs/resumable-streams.md: "Runs still pumping are bounded by their capacity slots
    times `resume_max_bytes`". An upstream (app A's, hostile) that never ends its event makes
    the pump's SSE parser hold every byte (SseParser._buffer, copied whole on every 64 KiB
    chunk: quadratic CPU on the event loop every application shares). Expected: the run is
    ended (and the upstream cut) once the unfinished event exceeds resume_max_bytes."""
    upstream, server = endless
    settings = app_settings(
        server.make_url("/v1"),
        {"RUN_HEARTBEAT_SECONDS": "0.1"},
        resumable=True,
        resume_window_seconds=30.0,
        resume_max_bytes=MAX_BYTES,
    )
    async with run_gateway(settings) as gw:
        response = await gw.client.post(CHAT, headers=CSRF, json={"message": "hi"})
        assert response.status == 200
        assert "X-Run-Id" in response.headers
        started = time.monotonic()
        # Keep reading the first answer (a reader present: no run_expired).
        reading = asyncio.create_task(response.content.read())
        try:
            await asyncio.wait_for(upstream.cut.wait(), 15)
        except TimeoutError:
            pass
        finally:
            reading.cancel()
            response.close()
        took = time.monotonic() - started
        tail = await _replay_tail(gw, response.headers["X-Run-Id"])
        assert b"upstream_event_too_large" in tail, tail[-300:]
        # Socket buffers may hold a few MiB beyond what the gateway took.
        assert upstream.cut.is_set() and upstream.sent <= 8 * MAX_BYTES, (
            f"upstream sent {upstream.sent / MAX_BYTES:.0f} MiB of one unfinished event "
            f"in {took:.1f} s and was not cut (resume_max_bytes = 1 MiB)"
        )


def test_the_parser_takes_a_never_ending_line_in_linear_time() -> None:
    """The same at the parser: feeding N chunks of one unterminated line costs O(N^2) bytes
    copied (`data = self._buffer + chunk`, then `b"\\r" in data` etc. over all of it)."""
    chunk = b"x" * (64 * 1024)

    def feed(chunks: int) -> float:
        parser = SseParser()
        parser.feed(b"data: ")
        t0 = time.perf_counter()
        for _ in range(chunks):
            parser.feed(chunk)
        return time.perf_counter() - t0

    small, large = feed(16), feed(128)  # 1 MiB, 8 MiB
    # Linear: 8x the bytes, ~8x the time. Quadratic: ~64x.
    assert large < 20 * max(small, 1e-3), (  # floor: a scheduler hiccup is not quadratic
        f"1 MiB: {small * 1000:.0f} ms, 8 MiB: {large * 1000:.0f} ms (x{large / small:.0f})"
    )


async def test_an_upstreams_endless_event_never_stalls_the_replica(
    endless: tuple[EndlessLineUpstream, TestServer],
) -> None:
    """What the parser's quadratic copy does to every other application on the replica: while
    app A's upstream streams one endless event, the event loop spends seconds per chunk in
    the parser, so any other request (here /healthz; the same for app B's resumes) waits.
    Expected: every /healthz answers within 0.5 s."""
    upstream, server = endless
    settings = app_settings(
        server.make_url("/v1"),
        {"RUN_HEARTBEAT_SECONDS": "0.1"},
        resumable=True,
        resume_window_seconds=30.0,
        resume_max_bytes=MAX_BYTES,
    )
    async with run_gateway(settings) as gw:
        response = await gw.client.post(CHAT, headers=CSRF, json={"message": "hi"})
        assert response.status == 200
        reading = asyncio.create_task(response.content.read())
        worst = 0.0
        try:
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and not upstream.cut.is_set():
                t0 = time.monotonic()
                async with gw.client.get("/healthz") as health:
                    assert health.status == 200
                worst = max(worst, time.monotonic() - t0)
                await asyncio.sleep(0.05)
        finally:
            reading.cancel()
            response.close()
        assert worst < 0.5, (
            f"/healthz took up to {worst:.2f} s while A's upstream had sent "
            f"{upstream.sent / MAX_BYTES:.0f} MiB of one event"
        )


class OneHugeEventUpstream:
    """An upstream that answers one (terminated) event of `size` bytes, then ends."""

    def __init__(self, size: int) -> None:
        self.size = size

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + b"z" * self.size + b"\n\n")
        await response.write_eof()
        return response


async def test_a_run_keeps_no_more_than_resume_max_bytes_even_of_one_event() -> None:
    """`resume_max_bytes`: "bytes of (framed) events kept per run; the oldest are dropped
    beyond". RunLog.extend (and the follower) never drop the last entry, so one event of any
    size is kept whole (in the process, in the ended-runs memory, and XADDed to Redis):
    4 MiB kept and replayed for a limit of 1 MiB."""
    upstream = OneHugeEventUpstream(4 * MAX_BYTES)
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    try:
        settings = app_settings(
            server.make_url("/v1"),
            {"RUN_HEARTBEAT_SECONDS": "0.1"},
            resumable=True,
            resume_window_seconds=30.0,
            resume_max_bytes=MAX_BYTES,
        )
        async with run_gateway(settings) as gw:
            response = await gw.client.post(CHAT, headers=CSRF, json={"message": "hi"})
            assert response.status == 200
            run_id = response.headers["X-Run-Id"]
            await response.read()
            async with gw.client.get(f"/apps/shop/runs/{run_id}") as replay:
                kept = len(await replay.read())
            assert kept <= MAX_BYTES, f"a run limited to 1 MiB replayed {kept >> 20} MiB"
            tail = await _replay_tail(gw, run_id)
            assert b"upstream_event_too_large" in tail, tail[-300:]
    finally:
        await server.close()


def test_the_parser_raises_past_max_held_for_an_unfinished_line_and_for_held_lines() -> None:
    parser = SseParser(max_held=100)
    parser.feed(b"data: " + b"x" * 90)
    with pytest.raises(EventTooLarge):
        parser.feed(b"x" * 10)
    lines = SseParser(max_held=100)
    with pytest.raises(EventTooLarge):
        for _ in range(20):
            lines.feed(b"data: abcdefgh\n")
    whole = SseParser(max_held=100)
    with pytest.raises(EventTooLarge):
        whole.feed(b"data: " + b"y" * 200 + b"\n\n")
    fits = SseParser(max_held=100)
    assert fits.feed(b"data: " + b"z" * 80 + b"\n\n") == [b"data: " + b"z" * 80]
    assert not fits.mid_event and fits.held_bytes == 0


@pytest.mark.parametrize("cut", [1, 2, 3, 50, 99, 100, 101])
def test_an_event_of_exactly_max_held_fits_wherever_its_bytes_are_cut(cut: int) -> None:
    """The unfinished event counts as the event it would be if it ended now (attack-23: its
    last LF counted, so an event of `max_held` bytes whose blank line came in the next read
    was refused, kept when whole)."""
    event = b"data: a\ndata: " + b"b" * 86  # 100 bytes
    stream = event + b"\n\n"
    parser = SseParser(max_held=100)
    assert parser.feed(stream[:cut]) + parser.feed(stream[cut:]) == [event]
    over = SseParser(max_held=99)
    with pytest.raises(EventTooLarge):
        over.feed(stream[:cut])
        over.feed(stream[cut:])


def test_the_events_before_an_oversized_one_come_with_the_error() -> None:
    parser = SseParser(max_held=20)
    with pytest.raises(EventTooLarge) as raised:
        parser.feed(b"data: a\n\ndata: b\n\ndata: " + b"c" * 30 + b"\n\ndata: d\n\n")
    assert raised.value.events == [b"data: a", b"data: b"]
    held = SseParser(max_held=20)
    with pytest.raises(EventTooLarge) as raised:
        held.feed(b"data: a\n\ndata: " + b"c" * 30)  # the big one unfinished
    assert raised.value.events == [b"data: a"]


def test_the_run_log_keeps_no_more_than_max_bytes_even_of_one_event() -> None:
    log = RunLog(max_events=100, max_bytes=1000)
    log.append(b"data: small")
    log.extend([b"data: " + b"x" * 2000])
    assert log.bytes <= 1000
    log.append(b"data: " + b"y" * 2000)
    assert log.bytes <= 1000
    log.append(b"data: small")
    assert 0 < log.bytes <= 1000
