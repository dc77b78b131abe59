"""Streaming through the agent proxy: no buffering, order, byte-for-byte bodies, backpressure,
SSE keep-alives, request bodies streamed upstream."""

from __future__ import annotations

import asyncio
import gzip
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from app.proxy import fastread
from app.proxy.relay import KEEPALIVE_COMMENT
from tests.conftest import CSRF
from tests.fake_upstream import (
    RunningGateway,
    ServedUpstream,
    app_settings,
    run_gateway,
    sse,
    sse_events,
    start_sse,
)

AGENT = "/apps/shop/agent"


@pytest.fixture(autouse=True, params=["fast", "public"])
def relay_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here on both of the relay's paths (app/proxy/fastread.py): aiohttp's
    internals, and its public API (as when the start-up self-check fails)."""
    monkeypatch.setattr(fastread, "ACTIVE", fastread.ACTIVE)  # restored after the test
    if request.param == "public":
        monkeypatch.setattr(fastread, "self_check", lambda: "the public path, for this test")
    return str(request.param)


async def read_until(
    content: aiohttp.StreamReader, done: bytes, *, count: int = 1, timeout: float = 5.0
) -> bytes:
    """Read until `done` occurs `count` times in what was read (fails after `timeout`)."""
    data = b""
    async with asyncio.timeout(timeout):
        while data.count(done) < count:
            chunk = await content.readany()
            if not chunk:
                raise AssertionError(f"stream ended before {done!r} x{count}: {data!r}")
            data += chunk
    return data


async def test_first_event_reaches_the_browser_before_the_upstream_finishes(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    release = asyncio.Event()
    first, rest = sse("token", {"text": "Hel"}), sse("token", {"text": "lo"}) + sse("done", {})

    async def chat(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(first)
        await release.wait()  # the upstream is still "thinking" until the test says so
        await response.write(rest)
        await response.write_eof()
        return response

    upstream.fake.on("/v1/chat", chat)
    async with gw.client.post(f"{AGENT}/chat", headers=CSRF, json={"message": "hi"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert "Content-Encoding" not in resp.headers
        got = await read_until(resp.content, b"\n\n")
        assert got == first, "the first event must arrive alone, before the upstream finished"
        assert not release.is_set()
        release.set()
        got += await resp.content.read()
    assert got == first + rest
    assert [e for e, _ in sse_events(got.decode())] == ["token", "token", "done"]


async def test_event_stream_bytes_pass_through_unchanged_whatever_the_chunking(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    # CRLF and CR line endings, an `id:`, a comment, multi-line data, non-ASCII, odd splits.
    body = (
        b": upstream comment\r\n\r\n"
        + b'id: 1\r\nevent: token\r\ndata: {"text": "caf\xc3\xa9"}\r\n\r\n'
        + b"retry: 3000\rdata: line one\rdata: line two\r\r"
        + b"".join(sse("token", {"i": i}) for i in range(300))
        + b"data: [DONE]\n\n"
    )

    async def chat(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        for start in range(0, len(body), 7):  # splits in the middle of lines and UTF-8
            await response.write(body[start : start + 7])
        await response.write_eof()
        return response

    upstream.fake.on("/v1/chat", chat)
    async with gw.client.post(f"{AGENT}/chat", headers=CSRF, data=b"{}") as resp:
        assert resp.status == 200
        assert await resp.read() == body


async def test_compressed_and_binary_bodies_pass_through_byte_for_byte(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    payload = os.urandom(300_000)
    compressed = gzip.compress(b'{"answer": "' + b"x" * 50_000 + b'"}')

    async def blob(request: web.Request) -> web.Response:
        return web.Response(body=payload, content_type="application/octet-stream")

    async def zipped(request: web.Request) -> web.Response:
        return web.Response(
            body=compressed,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for i in range(50):
            await response.write(b'{"n": %d}\n' % i)
        await response.write_eof()
        return response

    upstream.fake.on("/v1/blob", blob)
    upstream.fake.on("/v1/zipped", zipped)
    upstream.fake.on("/v1/ndjson", chunked)
    async with aiohttp.ClientSession(gw.url, auto_decompress=False) as raw_client:
        async with raw_client.get(f"{AGENT}/blob") as resp:
            assert resp.headers["Content-Length"] == str(len(payload))
            assert await resp.read() == payload
        async with raw_client.get(f"{AGENT}/zipped", headers={"Accept-Encoding": "gzip"}) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert resp.headers["Content-Length"] == str(len(compressed))
            assert await resp.read() == compressed, "compressed bytes must not be re-encoded"
        async with raw_client.get(f"{AGENT}/ndjson") as resp:
            assert "Content-Length" not in resp.headers
            assert resp.headers["X-Accel-Buffering"] == "no"
            assert await resp.read() == b"".join(b'{"n": %d}\n' % i for i in range(50))
    assert upstream.fake.seen[1].headers["Accept-Encoding"] == "gzip"


async def test_a_slow_browser_slows_the_upstream_read(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    total = 96 * 1024 * 1024
    chunk = b"z" * 65536
    sent = 0

    async def firehose(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        while sent < total:
            await response.write(chunk)
            sent += len(chunk)
        await response.write_eof()
        return response

    upstream.fake.on("/v1/firehose", firehose)
    async with gw.client.get(f"{AGENT}/firehose") as resp:
        assert resp.status == 200
        # The browser reads nothing: the upstream must stall once the buffers on the way
        # (kernel socket buffers, aiohttp's bounded reader) are full, far short of the total.
        previous = -1
        async with asyncio.timeout(20):
            while sent != previous:
                previous = sent
                await asyncio.sleep(0.15)
        assert 0 < sent < total // 2, f"upstream wrote {sent} bytes to a browser not reading"
        received = 0
        async for data in resp.content.iter_any():
            received += len(data)
    assert received == total == sent


async def test_keepalive_comments_during_upstream_silence(upstream: ServedUpstream) -> None:
    release = asyncio.Event()

    async def thinking(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse("status", {"thinking": True}))
        await release.wait()
        await response.write(sse("done", {}))
        await response.write_eof()
        return response

    upstream.fake.on("/v1/chat", thinking)
    settings = app_settings(upstream.base, {"SSE_KEEPALIVE_SECONDS": "0.02"})
    async with run_gateway(settings) as gw, gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
        got = await read_until(resp.content, b"\n\n")
        got += await read_until(resp.content, KEEPALIVE_COMMENT, count=2)
        release.set()
        got += await resp.content.read()
    events = sse_events(got.decode())
    assert events[0][0] == "status" and events[-1][0] == "done"
    assert set(events[1:-1]) == {(":", "keep-alive")}
    assert len(events) >= 4


async def test_no_keepalive_while_the_browser_is_not_reading(upstream: ServedUpstream) -> None:
    send_b, send_c = asyncio.Event(), asyncio.Event()
    a, b, c = sse("a", {}), sse("b", {}), sse("c", {})

    async def chat(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(a)
        await send_b.wait()
        await response.write(b)
        await send_c.wait()
        await response.write(c)
        await response.write_eof()
        return response

    upstream.fake.on("/v1/chat", chat)
    settings = app_settings(upstream.base, {"SSE_KEEPALIVE_SECONDS": "0.02"})
    async with run_gateway(settings) as gw, gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
        got = await read_until(resp.content, b"\n\n")
        # What the transport does when the browser stops reading and the write buffer passes
        # its high-water mark: the protocol is paused. Simulated so the test needs no
        # megabytes in flight (the buffer sizes differ from machine to machine).
        [connection] = gw.connections()
        connection.pause_writing()
        await asyncio.sleep(0.2)  # ten keep-alive periods
        send_b.set()
        got += await read_until(resp.content, b"event: b")
        connection.resume_writing()
        got += await read_until(resp.content, KEEPALIVE_COMMENT, count=2)  # resumed
        send_c.set()
        got += await resp.content.read()
    paused_window = got[got.index(a) + len(a) : got.index(b"event: b")]
    assert paused_window.count(KEEPALIVE_COMMENT) <= 1, paused_window  # at most one raced in
    assert got.endswith(c)


async def test_no_keepalive_inside_a_half_written_event(upstream: ServedUpstream) -> None:
    release = asyncio.Event()
    head, tail = b'event: token\ndata: {"text": "hal', b'f"}\n\n'

    async def stalls_mid_event(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(head)
        await release.wait()
        await response.write(tail)
        await response.write_eof()
        return response

    upstream.fake.on("/v1/chat", stalls_mid_event)
    settings = app_settings(upstream.base, {"SSE_KEEPALIVE_SECONDS": "0.02"})
    async with run_gateway(settings) as gw, gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
        assert await read_until(resp.content, b"hal") == head
        await asyncio.sleep(0.2)  # ten keep-alive periods inside the event
        release.set()
        rest = await resp.content.read()
    assert head + rest == head + tail, "a comment inside an event would corrupt it"


async def test_no_keepalive_on_other_streams(upstream: ServedUpstream) -> None:
    release = asyncio.Event()

    async def ndjson(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(b'{"a": 1}\n')
        await release.wait()
        await response.write(b'{"b": 2}\n')
        await response.write_eof()
        return response

    upstream.fake.on("/v1/run", ndjson)
    settings = app_settings(upstream.base, {"SSE_KEEPALIVE_SECONDS": "0.02"})
    async with run_gateway(settings) as gw, gw.client.post(f"{AGENT}/run", headers=CSRF) as resp:
        got = await read_until(resp.content, b"\n")
        await asyncio.sleep(0.2)  # ten keep-alive periods
        release.set()
        got += await resp.content.read()
    assert got == b'{"a": 1}\n{"b": 2}\n'


async def test_request_bodies_stream_upstream(upstream: ServedUpstream, gw: RunningGateway) -> None:
    first_arrived = asyncio.Event()

    async def upload(request: web.Request) -> web.Response:
        data = await request.content.readany()
        first_arrived.set()
        data += await request.content.read()
        encoding = request.headers.get("Transfer-Encoding")
        return web.json_response({"bytes": len(data), "te": encoding})

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        # The rest is only sent once the upstream has the first part: a gateway that buffered
        # the whole body before contacting the upstream would deadlock here.
        await asyncio.wait_for(first_arrived.wait(), timeout=5)
        yield b"b" * 1000

    upstream.fake.on("/v1/upload", upload)
    async with gw.client.post(f"{AGENT}/upload", headers=CSRF, data=body()) as resp:
        assert resp.status == 200
        assert await resp.json() == {"bytes": 2000, "te": "chunked"}


async def test_a_declared_length_body_keeps_its_length(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async with gw.client.put(f"{AGENT}/doc", headers=CSRF, data=b"x" * 5000) as resp:
        assert resp.status == 200
        assert await resp.json() == {"method": "PUT", "path": "/v1/doc", "body_bytes": 5000}
    assert upstream.fake.last.headers["Content-Length"] == "5000"
    assert "Transfer-Encoding" not in upstream.fake.last.headers
    assert upstream.fake.last.body == b"x" * 5000
