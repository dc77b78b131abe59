"""The relay's fast paths: buffered upstream bytes taken in one step, the response head and a
complete body leaving in one write, a head never held back by a silent upstream, no task per
stream for the shutdown signal or the disconnect watch, one disconnect timer for all streams,
no timer per relayed event (and the public-API fallback of each), an arrived small body sent
as is, header checks in one search, upstream URLs cached per agent path."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncGenerator, Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import http_writer, web
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from app.keys import LIFECYCLE_KEY
from app.proxy import errors, exchange, fastread, headers, urls, watch
from app.proxy.fastread import read_available, take_buffered, wait_readable, wake
from app.proxy.relay import KEEPALIVE_COMMENT, READ_CHUNK_BYTES
from tests.conftest import CSRF
from tests.fake_upstream import (
    RunningGateway,
    ServedUpstream,
    app_settings,
    run_gateway,
    sse,
    start_sse,
)

AGENT = "/apps/shop/agent"
EVENTS = [sse("token", {"i": i, "text": "x" * 150}) for i in range(40)]
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


# -- take_buffered: read_nowait's result and effect, one step ---------------------------------


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _CountingHandler(ResponseHandler):
    resumes = 0

    def resume_reading(self, resume_parser: bool = True) -> None:
        self.resumes += 1
        super().resume_reading(resume_parser)


def _fed(events: list[bytes], *, bufsize: int = 2**16) -> tuple[_CountingHandler, Any]:
    """A client connection whose response parser was fed a head and `events` as HTTP chunks."""
    protocol = _CountingHandler(asyncio.get_running_loop())
    protocol.connection_made(_Transport())
    protocol.set_response_params(read_bufsize=bufsize)
    protocol.data_received(HEAD)
    payload = protocol._payload
    assert isinstance(payload, aiohttp.StreamReader)
    protocol.data_received(b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events))
    protocol.resumes = 0
    return protocol, payload


def _state(payload: Any) -> tuple[object, ...]:
    return (
        payload._size,
        payload._cursor,
        payload._buffer_offset,
        len(payload._buffer),
        list(payload._http_chunk_splits or []),
    )


async def test_take_buffered_returns_what_read_nowait_returns_in_one_step() -> None:
    slow_protocol, slow = _fed(EVENTS)
    fast_protocol, fast = _fed(EVENTS)
    assert take_buffered(fast, READ_CHUNK_BYTES) == slow.read_nowait(READ_CHUNK_BYTES)
    assert _state(fast) == _state(slow)
    assert fast_protocol.resumes == 1  # aiohttp's read_nowait: once per buffered chunk
    assert slow_protocol.resumes == len(EVENTS)
    assert take_buffered(fast, READ_CHUNK_BYTES) == b"" == slow.read_nowait(READ_CHUNK_BYTES)


async def test_take_buffered_after_a_partial_read_and_beyond_the_limit() -> None:
    _, slow = _fed(EVENTS)
    _, fast = _fed(EVENTS)
    assert fast.read_nowait(7) == slow.read_nowait(7)  # leaves an offset in the first chunk
    assert take_buffered(fast, READ_CHUNK_BYTES) == slow.read_nowait(READ_CHUNK_BYTES)
    assert _state(fast) == _state(slow)
    # More buffered than the limit: aiohttp's own bounded read.
    _, slow = _fed(EVENTS)
    _, fast = _fed(EVENTS)
    assert take_buffered(fast, 1000) == slow.read_nowait(1000)
    assert _state(fast) == _state(slow)


async def test_take_buffered_resumes_a_paused_connection() -> None:
    # 40 events of ~180 B, a 1 KiB buffer: the connection pauses, the parser holds the rest.
    _, slow = _fed(EVENTS, bufsize=1024)
    fast_protocol, fast = _fed(EVENTS, bufsize=1024)
    assert isinstance(fast_protocol.transport, _Transport)
    assert fast_protocol.transport.paused
    # read_nowait resumes the connection inside its loop and takes what that fed at once; here
    # it waits for the next call. The bytes, in order, are the same.
    taken = b""
    while chunk := take_buffered(fast, READ_CHUNK_BYTES):
        taken += chunk
    assert taken == slow.read_nowait(READ_CHUNK_BYTES) == b"".join(EVENTS)
    assert not fast_protocol.transport.paused


def test_the_installed_aiohttp_has_the_reader_internals_the_fast_reads_use() -> None:
    assert fastread.self_check() is None, "aiohttp changed: the relay fell back to its public API"
    assert fastread.ACTIVE


async def test_without_the_internals_the_reads_are_aiohttps_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fastread, "ACTIVE", False)
    protocol, payload = _fed(EVENTS)
    assert take_buffered(payload, READ_CHUNK_BYTES) == b"".join(EVENTS)
    assert protocol.resumes == len(EVENTS), "one resume per chunk: aiohttp's read_nowait ran"
    protocol, payload = _fed(EVENTS)
    _, reference = _fed(EVENTS)
    assert await read_available(payload, READ_CHUNK_BYTES) == await reference.read(READ_CHUNK_BYTES)
    assert protocol.resumes > 1, "aiohttp's read ran (it resumes once per chunk)"


def test_the_self_check_refuses_internals_that_differ(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fastread, "ACTIVE", fastread.ACTIVE)  # restored after the test
    monkeypatch.setattr(fastread, "_READER_FIELDS", fastread._READER_FIELDS | {"_gone"})
    assert fastread.self_check() == "aiohttp.StreamReader lacks _gone"
    assert fastread.use(True) is False
    assert "relay fast paths off" in caplog.text and "_gone" in caplog.text
    assert type(fastread.relay_response()) is web.StreamResponse
    monkeypatch.undo()
    # A reader whose buffer is read otherwise than the fast path expects.
    monkeypatch.setattr(fastread, "ACTIVE", fastread.ACTIVE)

    def wrong(content: aiohttp.StreamReader, limit: int) -> bytes:
        return content.read_nowait(limit)[:-1]

    monkeypatch.setattr(fastread, "_join_buffered", wrong)
    assert "not read as expected" in (fastread.self_check() or "")
    assert fastread.use(True) is False


def test_fast_paths_off_takes_the_public_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastread, "ACTIVE", fastread.ACTIVE)  # restored after the test
    assert fastread.use(False) is False
    assert type(fastread.relay_response()) is web.StreamResponse
    assert fastread.use(True) is True
    assert type(fastread.relay_response()) is not web.StreamResponse


async def test_fast_paths_off_in_the_settings_relays_through_the_public_api(
    upstream: ServedUpstream, monkeypatch: pytest.MonkeyPatch, browser_writes_all: list[int]
) -> None:
    monkeypatch.setattr(fastread, "ACTIVE", fastread.ACTIVE)  # restored after the test

    async def burst(request: web.Request) -> web.StreamResponse:
        response = web.Response(body=b"".join(EVENTS), content_type="text/event-stream")
        response.enable_chunked_encoding()
        return response

    upstream.fake.on("/v1/chat", burst)
    async with run_gateway(app_settings(upstream.base, {"FAST_PATHS": "off"})) as gw:
        assert not fastread.ACTIVE
        async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
            assert resp.status == 200
            assert await resp.read() == b"".join(EVENTS)
    # The head leaves at `prepare()`, on its own: two writes, not one.
    assert len(browser_writes_all) == 2, browser_writes_all


async def test_read_available_waits_then_takes_every_chunk_that_arrived_in_one_step() -> None:
    protocol, payload = _fed([])
    reading = asyncio.ensure_future(read_available(payload, READ_CHUNK_BYTES))
    await asyncio.sleep(0)
    assert not reading.done()
    protocol.data_received(b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in EVENTS))
    protocol.resumes = 0
    assert await reading == b"".join(EVENTS)
    assert protocol.resumes == 1  # aiohttp's read: once per chunk
    # The end, and an error while waiting, as `read` has them.
    protocol.data_received(b"0\r\n\r\n")
    assert await read_available(payload, READ_CHUNK_BYTES) == b""
    _, failing = _fed([])
    reading = asyncio.ensure_future(read_available(failing, READ_CHUNK_BYTES))
    await asyncio.sleep(0)
    failing.set_exception(aiohttp.ClientPayloadError("cut"))
    with pytest.raises(aiohttp.ClientPayloadError):
        await reading


async def test_wait_readable_ends_on_data_on_the_end_on_an_error_and_on_wake() -> None:
    protocol, payload = _fed([])
    assert fastread.can_wake(payload)
    waiting = asyncio.ensure_future(wait_readable(payload))
    await asyncio.sleep(0)
    assert not waiting.done()
    wake(payload)  # woken: returns, nothing read, nothing lost
    await waiting
    assert take_buffered(payload, READ_CHUNK_BYTES) == b""
    wake(payload)  # no wait pending: nothing happens
    waiting = asyncio.ensure_future(wait_readable(payload))
    await asyncio.sleep(0)
    protocol.data_received(b"%x\r\n%s\r\n" % (len(EVENTS[0]), EVENTS[0]))
    await waiting
    assert take_buffered(payload, READ_CHUNK_BYTES) == EVENTS[0]
    waiting = asyncio.ensure_future(wait_readable(payload))
    await asyncio.sleep(0)
    protocol.data_received(b"0\r\n\r\n")
    await waiting
    assert payload.at_eof()
    _, failing = _fed([])
    waiting = asyncio.ensure_future(wait_readable(failing))
    await asyncio.sleep(0)
    failing.set_exception(aiohttp.ClientPayloadError("cut"))
    with pytest.raises(aiohttp.ClientPayloadError):
        await waiting
    assert not fastread.can_wake(failing)  # a stored error: the public read reports it


async def test_without_the_internals_the_relay_waits_through_the_public_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fastread, "ACTIVE", False)
    _, payload = _fed([])
    assert not fastread.can_wake(payload)


# -- through the gateway ----------------------------------------------------------------------


@pytest.fixture(params=["internals", "public"])
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test using it runs on both relay waits: aiohttp's reader internals (the fenced fast
    path: `wait_readable` ended by one lazy alarm) and the public fallback (`read` under an
    `asyncio.timeout` per wait)."""
    monkeypatch.setattr(fastread, "ACTIVE", fastread.ACTIVE)  # restored after the test
    if request.param == "public":
        monkeypatch.setattr(fastread, "ACTIVE", False)
        # A gateway created in the test sets the switch again (`fastread.use`): fail its check.
        monkeypatch.setattr(fastread, "self_check", lambda: "the public path, for this test")
    return str(request.param)


async def test_keepalives_and_events_on_both_relay_waits(
    upstream: ServedUpstream, read_path: str
) -> None:
    release = asyncio.Event()

    async def pauses(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        for event in EVENTS[:5]:
            await response.write(event)
            await asyncio.sleep(0.01)
        await release.wait()
        await response.write(EVENTS[5])
        await response.write_eof()
        return response

    upstream.fake.on("/v1/chat", pauses)
    settings = app_settings(upstream.base, {"SSE_KEEPALIVE_SECONDS": "0.05"})
    async with run_gateway(settings) as gw, gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
        got = b""
        async with asyncio.timeout(5):
            while got.count(KEEPALIVE_COMMENT) < 2:
                got += await resp.content.readany()
        release.set()
        got += await resp.content.read()
    assert got.replace(KEEPALIVE_COMMENT, b"") == b"".join(EVENTS[:6])


async def test_relaying_events_schedules_no_timer_per_event(
    upstream: ServedUpstream, gw: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 events with pauses between them (a wait before each): the relay's idle and keep-alive
    deadline is one lazy timer, not an `asyncio.timeout` per wait (40 of them before)."""

    async def paced(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        for event in EVENTS:
            await response.write(event)
            await asyncio.sleep(0.002)
        await response.write_eof()
        return response

    upstream.fake.on("/v1/chat", paced)
    created = 0
    original = asyncio.Timeout.__init__

    def counting(self: asyncio.Timeout, when: float | None) -> None:
        nonlocal created
        created += 1
        original(self, when)

    monkeypatch.setattr(asyncio.Timeout, "__init__", counting)
    async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
        assert await resp.read() == b"".join(EVENTS)
    assert created < 10, f"{created} asyncio.Timeout objects for one stream of 40 waits"


async def test_open_streams_share_one_disconnect_timer(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async def first_then_silence(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(EVENTS[0])
        await asyncio.sleep(60)
        return response

    upstream.fake.on("/v1/chat", first_then_silence)
    loop = asyncio.get_running_loop()
    responses = []
    for _ in range(3):
        resp = await gw.client.post(f"{AGENT}/chat", headers=CSRF)
        assert await resp.content.readexactly(len(EVENTS[0])) == EVENTS[0]
        responses.append(resp)
    wheel = watch._WHEELS[loop]
    assert len(wheel.watches) == 3 and wheel.handle is not None  # one timer, three watches
    responses[0].close()  # a browser gone: its watch (polled by the wheel) cancels its exchange
    async with asyncio.timeout(5):
        while len(wheel.watches) != 2:
            await asyncio.sleep(0.05)
    for resp in responses[1:]:
        resp.close()
    async with asyncio.timeout(5):
        while loop in watch._WHEELS:
            await asyncio.sleep(0.05)
    assert wheel.handle is None  # no watch left: no timer left


@pytest.fixture
def browser_writes(gw: RunningGateway) -> Iterator[list[int]]:
    """Byte counts of each write the gateway makes to a browser connection."""
    yield from _writes(lambda protocol: getattr(protocol, "_manager", None) is gw.runner.server)


@pytest.fixture
def browser_writes_all(upstream: ServedUpstream) -> Iterator[list[int]]:
    """Byte counts of each write of any aiohttp server in this test but `upstream`'s (for a
    test that starts its one gateway itself)."""
    assert upstream.server.runner is not None
    upstream_side = upstream.server.runner.server

    def gateway_side(protocol: Any) -> bool:
        manager = getattr(protocol, "_manager", None)
        return manager is not None and manager is not upstream_side

    yield from _writes(gateway_side)


def _writes(server_side: Callable[[Any], bool]) -> Iterator[list[int]]:
    writes: list[int] = []
    original_write = http_writer.StreamWriter._write
    original_writelines = http_writer.StreamWriter._writelines

    def ours(writer: http_writer.StreamWriter) -> bool:
        return server_side(writer.protocol)

    def write(self: http_writer.StreamWriter, chunk: Any) -> None:
        if ours(self):
            writes.append(len(chunk))
        original_write(self, chunk)

    def writelines(self: http_writer.StreamWriter, chunks: Any) -> None:
        if ours(self):
            chunks = list(chunks)
            writes.append(sum(len(c) for c in chunks))
        original_writelines(self, chunks)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(http_writer.StreamWriter, "_write", write)
        patch.setattr(http_writer.StreamWriter, "_writelines", writelines)
        yield writes


async def test_a_complete_burst_leaves_with_its_head_and_end_in_one_write(
    upstream: ServedUpstream, gw: RunningGateway, browser_writes: list[int]
) -> None:
    async def burst(request: web.Request) -> web.StreamResponse:
        # Head, chunked body and its end in one send: the gateway reads all of it at once.
        response = web.Response(body=b"".join(EVENTS), content_type="text/event-stream")
        response.enable_chunked_encoding()
        return response

    upstream.fake.on("/v1/chat", burst)
    async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
        assert resp.status == 200
        assert await resp.read() == b"".join(EVENTS)
    assert len(browser_writes) == 1, browser_writes


async def test_the_head_is_not_held_back_while_the_upstream_is_silent(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    release = asyncio.Event()

    async def head_then_silence(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await release.wait()
        await response.write(EVENTS[0])
        await response.write_eof()
        return response

    upstream.fake.on("/v1/chat", head_then_silence)
    async with asyncio.timeout(5):
        async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
            assert resp.status == 200  # the head arrived while the upstream still says nothing
            assert resp.headers["Content-Type"] == "text/event-stream"
            release.set()
            assert await resp.read() == EVENTS[0]


def _tasks_running(name: str) -> int:
    return sum(
        1 for task in asyncio.all_tasks() if getattr(task.get_coro(), "__qualname__", "") == name
    )


async def test_open_streams_share_one_shutdown_waiter_and_no_watcher_task(
    upstream: ServedUpstream, gw: RunningGateway, read_path: str
) -> None:
    async def first_then_silence(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(EVENTS[0])
        await asyncio.sleep(60)
        return response

    upstream.fake.on("/v1/chat", first_then_silence)

    async def open_stream() -> AsyncGenerator[aiohttp.ClientResponse, None]:
        async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
            assert await resp.content.readexactly(len(EVENTS[0])) == EVENTS[0]
            yield resp

    streams = [open_stream() for _ in range(3)]
    responses = [await anext(s) for s in streams]
    assert _tasks_running("Event.wait") == 0  # no stop_streams waiter per stream
    assert _tasks_running("StreamStop._wait") == 1
    assert _tasks_running("_watch_disconnect") == 0
    gw.app[LIFECYCLE_KEY].stop_streams.set()
    for resp in responses:
        async with asyncio.timeout(5):
            rest = await resp.read()
        assert b"event: error" in rest and b"shutting_down" in rest
    for s in streams:
        await s.aclose()


async def test_a_small_body_that_arrived_with_the_head_is_sent_without_streaming_it(
    upstream: ServedUpstream, gw: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_streaming(self: object, cap: int) -> None:
        raise AssertionError("the arrived body was read through the streaming path")

    monkeypatch.setattr(exchange.Exchange, "body", no_streaming)
    async with gw.client.put(f"{AGENT}/doc", headers=CSRF, data=b"x" * 500) as resp:
        assert resp.status == 200
        assert await resp.json() == {"method": "PUT", "path": "/v1/doc", "body_bytes": 500}
    assert upstream.fake.last.headers["Content-Length"] == "500"
    assert upstream.fake.last.body == b"x" * 500


# -- header checks: one search per message, a cached URL per agent path ---------------------


def test_a_repeated_agent_path_is_checked_and_built_once() -> None:
    base = URL("http://agent.internal:9000/v1")
    urls.build_upstream_url.cache_clear()
    first = urls.build_upstream_url(base, "chat/stream", "a=1")
    assert urls.build_upstream_url(base, "chat/stream", "a=1") is first
    assert urls.build_upstream_url.cache_info().hits == 1
    assert str(first) == "http://agent.internal:9000/v1/chat/stream?a=1"
    for _ in range(2):  # a refusal is not cached: it is refused every time
        with pytest.raises(errors.InvalidPath):
            urls.build_upstream_url(base, "%2e%2e/admin", "")


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_forwardable_headers_with_one_search_and_the_cookie_exception() -> None:
    assert headers.forwardable_headers(_headers(("Accept", "text/event-stream"), ("X-A", "a\tb")))
    # Cookie is never forwarded: its value may hold anything.
    assert headers.forwardable_headers(_headers(("Cookie", "s=caf\xe9"), ("Accept", "*/*")))
    assert not headers.forwardable_headers(_headers(("Cookie", "s=1"), ("X-Name", "caf\xe9")))


def test_invalid_upstream_header_with_one_search() -> None:
    def answer(reason: str, *pairs: tuple[str, str]) -> Any:
        return SimpleNamespace(reason=reason, headers=_headers(*pairs))

    assert not headers.has_invalid_header(answer("OK", ("X-A", "a\tb"), ("Server", "s")))
    assert headers.has_invalid_header(answer("O\x01K", ("X-A", "a")))
    assert headers.has_invalid_header(answer("OK", ("X-A", "a"), ("X-B", "b\x7f")))
    assert headers.has_invalid_header(answer("OK", ("X-\x02", "a")))


async def test_an_open_stream_does_not_hold_the_browsers_body(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    """A small body (read whole, sent as bytes) is dropped once it was sent: a stream that runs
    for minutes does not keep its request (a chat history) in memory. Six open streams (one
    session) with a 60 KB body each hold no allocation of that size (the upstream here drops
    what it reads)."""
    size = 60_000
    release = asyncio.Event()

    async def consume_then_wait(request: web.Request) -> web.StreamResponse:
        while await request.content.read(65_536):
            pass  # read and dropped (request.read() would keep it on the request)
        response = await start_sse(request)
        await response.write(EVENTS[0])
        await release.wait()
        await response.write_eof()
        return response

    upstream.fake.on("/v1/chat", consume_then_wait)
    body = b"x" * size
    tracemalloc.start(25)
    try:
        responses = []
        for _ in range(6):  # under the per-session cap (8)
            resp = await gw.client.post(f"{AGENT}/chat", data=body, headers=CSRF)
            assert resp.status == 200, await resp.text()
            assert await resp.content.readexactly(len(EVENTS[0])) == EVENTS[0]
            responses.append(resp)
        held = [trace for trace in tracemalloc.take_snapshot().traces if trace.size >= size]
    finally:
        tracemalloc.stop()
        release.set()
    for resp in responses:
        await resp.read()
        resp.close()
    assert held == [], f"{len(held)} request bodies held by open streams"


async def test_a_failing_disconnect_poll_never_stops_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The wheel polls every open exchange in one callback: one poll that raises is dropped
    and logged, the others are still polled at the next ticks."""

    class Probe:
        def __init__(self, fail: bool) -> None:
            self.fail, self.polls = fail, 0

        def poll(self) -> bool:
            self.polls += 1
            if self.fail:
                raise RuntimeError("broken poll")
            return True

    loop = asyncio.get_running_loop()
    wheel = watch._Wheel(loop)
    broken, healthy = Probe(fail=True), Probe(fail=False)
    for probe in (broken, healthy):
        wheel.add(cast(watch.DisconnectWatch, probe))
    await asyncio.sleep(watch.DISCONNECT_POLL_SECONDS * 2.5)
    assert broken.polls == 1 and healthy.polls >= 2
    assert "disconnect watch failed" in caplog.text
    wheel.discard(cast(watch.DisconnectWatch, healthy))
    assert wheel.handle is None


async def test_the_reads_take_what_arrived_before_an_error_then_raise_it() -> None:
    """The connection failed after bytes arrived (a reset right after an answer): aiohttp's
    public reads raise the stored error and drop them; the fast reads take them first (a run
    lost every event of such an answer: tests/test_runs_whole_attacks2.py)."""
    _, payload = _fed(EVENTS)
    payload.set_exception(aiohttp.ClientPayloadError("reset"))
    assert take_buffered(payload, READ_CHUNK_BYTES) == b"".join(EVENTS)
    with pytest.raises(aiohttp.ClientPayloadError):
        take_buffered(payload, READ_CHUNK_BYTES)
    _, payload = _fed(EVENTS)
    payload.set_exception(aiohttp.ClientPayloadError("reset"))
    assert await read_available(payload, READ_CHUNK_BYTES) == b"".join(EVENTS)
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_available(payload, READ_CHUNK_BYTES)
