"""Catalogue rows U* (docs/reliability.md): the upstream agent misbehaves.

The gateway runs as `python -m app` runs it (`run_gateway`: no handler cancellation on
disconnect), in front of a fake upstream agent, with `tests/fault_proxy.py` in between for
network faults (refused, black hole, resets) or a raw-socket upstream for malformed HTTP.
After every fault: the browser got the documented answer, the session (its data and its
conversation id) is unchanged, the gateway released its upstream connection, and the next
request succeeds. Rows proven elsewhere are listed in `tests/test_reliability_catalogue.py`.

The large-stream rows (U6 huge events and endless lines, U10 compression bombs) run against a
real `python -m app` process, so its memory (RSS) can be measured while a browser stalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from app.loadkit.ports import free_port
from tests.conftest import CSRF
from tests.fake_upstream import (
    RunningGateway,
    ServedUpstream,
    app_settings,
    run_gateway,
    serve_upstream,
    sse,
    sse_events,
    start_sse,
)
from tests.fault_proxy import FaultProxy
from tests.gateway_process import GatewayProcess

AGENT = "/apps/shop/agent"
SESSION = "/apps/shop/session"
THREAD = "X-Agent-Thread-Id"


# -- a gateway in front of a fault proxy in front of a fake upstream ------------------------


@dataclass
class Rig:
    upstream: ServedUpstream
    proxy: FaultProxy
    gw: RunningGateway
    thread: str = ""

    async def remember_session(self) -> None:
        """Give the browser a session with data and a conversation (the things to keep)."""
        resp = await self.gw.client.patch(SESSION, json={"keep": 1}, headers=CSRF)
        assert resp.status == 200
        async with self.gw.client.post(f"{AGENT}/ok", headers=CSRF) as ok:
            assert ok.status == 200
        self.thread = self.upstream.fake.last.headers[THREAD]

    async def assert_nothing_lost(self) -> None:
        """Session data and conversation unchanged; the upstream connection released; the
        next agent request succeeds on the same conversation."""
        await self.proxy.wait_closed_all()
        self.proxy.heal()
        resp = await self.gw.client.get(SESSION)
        assert (resp.status, await resp.json()) == (200, {"data": {"keep": 1}})
        async with self.gw.client.post(f"{AGENT}/ok", headers=CSRF) as ok:
            assert ok.status == 200
            assert await ok.json() == {"ok": True}
        assert self.upstream.fake.last.headers[THREAD] == self.thread


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True}, headers={"Connection": "close"})


@pytest.fixture
async def rig(aiohttp_server: AiohttpServer) -> AsyncIterator[Rig]:
    upstream = await serve_upstream(aiohttp_server)
    upstream.fake.on("/v1/ok", ok)
    async with FaultProxy(upstream.server.port or 0) as proxy:
        # Short enough for the timeout rows (U2, U3) to be quick, long enough that a loop
        # stall on a busy CI machine is not a 504 in the setup's own request (seen at 0.5 s).
        settings = app_settings(
            f"{proxy.url}/v1", connect_timeout_seconds=1.5, idle_timeout_seconds=0.75
        )
        async with run_gateway(settings) as gw:
            rig = Rig(upstream=upstream, proxy=proxy, gw=gw)
            await rig.remember_session()
            yield rig


def error_code(body: bytes) -> str:
    events = sse_events(body.decode(errors="replace"))
    assert events and events[-1][0] == "error", events[-3:]
    code: str = json.loads(events[-1][1])["code"]
    return code


async def event_stream(request: web.Request) -> web.StreamResponse:
    """One event, then one every 0.1 s for a long time."""
    response = await start_sse(request)
    await response.write(sse("token", {"n": 0}))
    for n in range(1, 100):
        await asyncio.sleep(0.1)
        await response.write(sse("token", {"n": n}))
    return response


# -- U1, U2: before any response header ------------------------------------------------------


async def test_U01_a_connection_reset_at_once_is_a_fast_502_never_retried(rig: Rig) -> None:
    rig.proxy.refuse = True
    accepted = rig.proxy.accepted
    async with rig.gw.client.post(f"{AGENT}/chat", headers=CSRF, data=b"{}") as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["code"] == "upstream_unavailable"
    assert rig.proxy.accepted == accepted + 1, "a POST to the agent was retried"
    await rig.assert_nothing_lost()


async def test_U02_a_black_holed_upstream_is_a_504_after_the_connect_timeout(rig: Rig) -> None:
    rig.proxy.black_hole = True  # connects, takes the request, never answers
    async with rig.gw.client.post(f"{AGENT}/chat", headers=CSRF, data=b"{}") as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "upstream_timeout"
    await rig.assert_nothing_lost()  # incl. the gateway closed its upstream connection


# -- U3, U4: after the stream started ---------------------------------------------------------


async def test_U03_an_upstream_gone_silent_mid_stream_ends_with_an_idle_timeout_event(
    rig: Rig,
) -> None:
    rig.upstream.fake.on("/v1/chat", event_stream)
    async with rig.gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert sse_events(first.decode()) == [("token", '{"n": 0}')]
        rig.proxy.black_hole = True  # the network goes quiet, nothing is closed
        rest = await resp.read()
    assert error_code(rest) == "upstream_idle_timeout"
    await rig.assert_nothing_lost()


@pytest.mark.parametrize("how", ["reset", "fin"])
async def test_U04_an_upstream_cut_between_events_ends_with_an_error_event(
    rig: Rig, how: str
) -> None:
    rig.upstream.fake.on("/v1/chat", event_stream)
    async with rig.gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        assert (rig.proxy.reset_all() if how == "reset" else rig.proxy.close_all()) == 1
        rest = await resp.read()
    assert error_code(rest) == "upstream_stream_error"
    await rig.assert_nothing_lost()


@pytest.mark.parametrize("how", ["reset", "fin"])
async def test_U04_an_upstream_cut_inside_an_event_aborts_the_browser_connection(
    rig: Rig, how: str
) -> None:
    """An `event: error` appended to half an event would corrupt both: the browser's
    connection is aborted instead, so it can tell the stream did not end normally."""
    wrote_half = asyncio.Event()

    async def half_event(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(b'event: token\ndata: {"n": ')
        wrote_half.set()
        await asyncio.sleep(30)
        return response

    rig.upstream.fake.on("/v1/chat", half_event)
    async with rig.gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
        assert resp.status == 200
        await wrote_half.wait()
        await asyncio.sleep(0.1)
        rig.proxy.reset_all() if how == "reset" else rig.proxy.close_all()
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await rig.assert_nothing_lost()


# -- U5: garbage SSE (web-platform-tests eventsource cases) ----------------------------------

# The gateway relays bytes: whatever the upstream writes reaches the browser unchanged (the
# browser's EventSource applies the WHATWG parsing rules), never a 500, never an injected event.
GARBAGE_SSE: dict[str, tuple[dict[str, str], bytes]] = {
    # eventsource/format-newlines.htm: CR, LF and CRLF line endings, mixed.
    "cr-only-line-endings": ({}, b"data: a\rdata: b\r\rid: 1\r\rdata: c\r\r"),
    "mixed-line-endings": ({}, b"data: a\r\n\r\ndata: b\n\r\ndata: c\r\r\n"),
    # format-field-id-null.htm: NUL in an id (the browser ignores that id).
    "nul-in-id": ({}, b"id: a\x00b\ndata: x\n\nid: \x00\ndata: y\n\n"),
    # format-utf-8.htm / format-bom*.htm: invalid UTF-8, a BOM, two BOMs.
    "invalid-utf8": ({}, b"data: \xff\xfe\xfd\xc3\x28\n\n"),
    "bom": ({}, b"\xef\xbb\xbfdata: x\n\n"),
    "two-boms": ({}, b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n"),
    # format-field-retry-bogus.htm, format-field-unknown.htm, format-comments.htm.
    "bogus-retry": ({}, b"retry: 10x\ndata: x\n\nretry: -1\ndata: y\n\n"),
    "unknown-fields-and-comments": ({}, b"foo: bar\nevent\n:comment\ndata\n\n: \n\n"),
    # format-data-before-final-empty-line.htm: no blank line ever (no event dispatched).
    "no-final-blank-line": ({}, b"data: a\ndata: b\ndata: c"),
    "nul-bytes": ({}, b"\x00" * 4096),
    # format-mime-*: wrong, bogus or missing Content-Type (the body is not SSE to a browser).
    "wrong-content-type": ({"Content-Type": "text/plain"}, b"data: x\n\n"),
    "bogus-content-type": ({"Content-Type": "text/event-stream;;;charset=utf-9"}, b"data: x\n\n"),
    "no-content-type": ({"Content-Type": ""}, b"data: x\n\n"),
}


@pytest.mark.parametrize("case", GARBAGE_SSE)
async def test_U05_garbage_sse_passes_through_byte_for_byte(rig: Rig, case: str) -> None:
    headers, body = GARBAGE_SSE[case]

    async def garbage(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "Connection": "close",  # so the gateway's upstream connection is not pooled
                **headers,
            }
        )
        if headers.get("Content-Type") == "":
            del response.headers["Content-Type"]
        await response.prepare(request)
        for start in range(0, len(body), 5):  # split mid-line, mid-CRLF, mid-UTF-8
            await response.write(body[start : start + 5])
        await response.write_eof()
        return response

    rig.upstream.fake.on("/v1/chat", garbage)
    async with rig.gw.client.post(
        f"{AGENT}/chat", headers={**CSRF, "Accept": "text/event-stream"}
    ) as resp:
        assert resp.status == 200
        assert await resp.read() == body
    await rig.assert_nothing_lost()


# -- U7, U8: malformed upstream HTTP --------------------------------------------------------


@dataclass
class RawUpstream:
    """A socket-level upstream: reads a request head (and its Content-Length body), then
    writes the next scripted answer (or a good one when the script is empty)."""

    script: list[list[bytes | float]] = field(default_factory=list)
    server: asyncio.Server | None = None
    connections: int = 0

    GOOD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"
    GOOD += b'Connection: close\r\n\r\n{"ok":true}'

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":")[1]))
            steps = self.script.pop(0) if self.script else [self.GOOD]
            for step in steps:
                if isinstance(step, float):
                    await asyncio.sleep(step)
                else:
                    writer.write(step)
                    await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    raw = RawUpstream()
    raw.server = await asyncio.start_server(raw.serve, "127.0.0.1", 0)
    yield raw
    raw.server.close()
    await raw.server.wait_closed()


OK_HEAD = b"HTTP/1.1 200 OK\r\n"
MALFORMED: dict[str, bytes] = {
    "nul-in-header": OK_HEAD + b"X-Bad: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "ctl-in-header": OK_HEAD + b"X-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok",
    "del-in-header": OK_HEAD + b"X-Bad: a\x7fb\r\nContent-Length: 2\r\n\r\nok",
    "bare-cr-in-header": OK_HEAD + b"X-Bad: a\rb\r\nContent-Length: 2\r\n\r\nok",
    "cr-in-reason": b"HTTP/1.1 200 O\rK\r\nContent-Length: 2\r\n\r\nok",
    "ctl-in-reason": b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok",
    "bad-status-line": b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok",
    "not-http-at-all": b"SSH-2.0-OpenSSH_9.2\r\n",
    "http-0.9-body": b"ok",
    "content-length-and-chunked": OK_HEAD
    + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "two-content-lengths": OK_HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "negative-content-length": OK_HEAD + b"Content-Length: -1\r\n\r\nok",
    "bad-chunk-size": OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "body-on-204": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
    # U8: a header over the client's line limit, more headers than its max.
    "huge-header": OK_HEAD + b"X-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 2\r\n\r\nok",
    "too-many-headers": OK_HEAD
    + b"".join(b"X-H%d: v\r\n" % i for i in range(500))
    + b"Content-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("case", MALFORMED)
async def test_U07_U08_malformed_upstream_http_is_a_502_protocol_error(
    raw_upstream: RawUpstream, case: str
) -> None:
    settings = app_settings(f"http://127.0.0.1:{raw_upstream.port}/v1")
    async with run_gateway(settings) as gw:
        resp = await gw.client.patch(SESSION, json={"keep": 1}, headers=CSRF)
        assert resp.status == 200
        raw_upstream.script.append([MALFORMED[case]])
        async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
            assert resp.status == 502
            body = await resp.json()
            assert resp.headers["Cache-Control"] == "no-store"
        assert body["error"]["code"] == "upstream_protocol_error"
        assert b"X-Bad" not in json.dumps(body).encode(), "upstream bytes echoed"
        # Nothing lost: the session is intact and the next request is served.
        resp = await gw.client.get(SESSION)
        assert await resp.json() == {"data": {"keep": 1}}
        async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
            assert (resp.status, await resp.json()) == (200, {"ok": True})


# After the head and one whole event: a chunk size that is not hex (nothing more reaches the
# browser), a chunk longer than its size or a truncated one (a few bytes of a next event do).
BAD_CHUNKS = {"not-hex-size": b"zz\r\n", "too-long": b"3\r\nabcde\r\n", "truncated": b"5\r\nab"}


@pytest.mark.parametrize("case", BAD_CHUNKS)
async def test_U07_bad_chunk_framing_after_the_stream_started_is_never_a_clean_end(
    raw_upstream: RawUpstream, case: str
) -> None:
    """Cut between two events: `event: error`; cut inside one: the browser's connection is
    aborted. aiohttp's C response parser silently stalls on a non-hex chunk size (the
    pure-Python one raises at once): then the application's idle timeout ends the stream."""
    event = b'event: token\ndata: {"n": 0}\n\n'
    head = OK_HEAD + b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (len(event), event)
    raw_upstream.script.append([head + chunk, 0.1, BAD_CHUNKS[case], 0.15])
    settings = app_settings(f"http://127.0.0.1:{raw_upstream.port}/v1", idle_timeout_seconds=0.4)
    async with run_gateway(settings) as gw:
        async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
            assert resp.status == 200
            if case == "not-hex-size":
                body = await asyncio.wait_for(resp.read(), 10)
                assert body.startswith(event)
                assert error_code(body) in ("upstream_stream_error", "upstream_idle_timeout")
            else:
                assert await resp.content.readuntil(b"\n\n") == event
                with pytest.raises(aiohttp.ClientPayloadError):
                    await asyncio.wait_for(resp.read(), 10)
        # A fresh connection: the cut one is gone.
        async with (
            aiohttp.ClientSession(gw.url) as fresh,
            fresh.post(f"{AGENT}/chat", headers=CSRF) as resp,
        ):
            assert resp.status == 200


# -- U6, U10: huge events, endless lines, compression bombs (a real process, RSS measured) ---


UPSTREAM_PORT = free_port()
MIB = 1024 * 1024
# How much the gateway's resident memory may grow while it relays tens of MiB to a browser
# that stopped reading: buffers are bounded (64 KiB reads, transport high-water marks).
RSS_GROWTH_BOUND = 24 * MIB


@pytest.fixture(scope="module")
def big_gateway(
    tier_system: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    apps = tmp_path_factory.mktemp("u6") / "apps.toml"
    apps.write_text(
        "[apps.shop]\n"
        f'upstream = "http://127.0.0.1:{UPSTREAM_PORT}/v1"\n'
        "idle_timeout_seconds = 20\n"
    )
    proc = GatewayProcess({"APPS_FILE": str(apps), "LOG_LEVEL": "warning"})
    proc.start()
    yield proc
    proc.close()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def serve_on_fixed_port(aiohttp_server: AiohttpServer, app: web.Application) -> None:
    for _ in range(50):  # the previous test's server may still hold the port for a moment
        with contextlib.suppress(OSError):
            await aiohttp_server(app, port=UPSTREAM_PORT)
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"port {UPSTREAM_PORT} stayed busy")


async def stalled_read(
    proc: GatewayProcess, path: str, *, headers: dict[str, str] | None = None
) -> tuple[int, bytes, int]:
    """Request `path`, read the head and a little body, stop reading for a second (the
    gateway now holds what it cannot send), measure its RSS growth, then read everything.
    Returns (status, body, RSS growth while stalled)."""
    before = rss(proc.pid)
    reader, writer = await asyncio.open_connection("127.0.0.1", proc.port, limit=MIB)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-CSRF: 1\r\nContent-Length: 0\r\n"
        f"Connection: close\r\n{extra}\r\n".encode()
    )
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split()[1])
        first = await reader.read(1024)
        await asyncio.sleep(1.0)
        grew = rss(proc.pid) - before
        rest = await asyncio.wait_for(reader.read(), 60)
    finally:
        writer.close()
    raw = first + rest
    if b"transfer-encoding: chunked" in head.lower():
        raw = _dechunk(raw)
    return status, raw, grew


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def huge_body(kind: str) -> tuple[bytes, bytes]:
    """(a block, how many times) -> the upstream writes `block` that often, then a tail."""
    if kind == "huge-event":  # one 48 MiB `data:` line, then a normal event
        return b"x" * MIB, b"\n\nevent: done\ndata: {}\n\n"
    return b"y" * MIB, b""  # an endless line: 48 MiB, never a newline, then the stream ends


@pytest.mark.parametrize("kind", ["huge-event", "endless-line"])
async def test_U06_huge_events_and_endless_lines_are_relayed_in_bounded_memory(
    big_gateway: GatewayProcess, aiohttp_server: AiohttpServer, kind: str
) -> None:
    block, tail = huge_body(kind)
    count = 48
    expected = hashlib.sha256()

    async def flood(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(b"data: ")
        for _ in range(count):
            await response.write(block)
        await response.write(tail)
        await response.write_eof()
        return response

    expected.update(b"data: " + block * count + tail)
    app = web.Application()
    app.router.add_post("/v1/flood", flood)
    await serve_on_fixed_port(aiohttp_server, app)
    status, body, grew = await stalled_read(big_gateway, f"{AGENT}/flood")
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == expected.hexdigest(), "bytes changed on the way"
    assert grew < RSS_GROWTH_BOUND, f"the gateway grew {grew / MIB:.1f} MiB for a stalled reader"
    assert big_gateway.get_status("/healthz") == 200


def gzip_bomb(size: int) -> bytes:
    """`size` zero bytes, gzip-compressed (about 1000:1)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MIB)
    parts = [compressor.compress(zeros) for _ in range(size // MIB)]
    return b"".join(parts) + compressor.flush()


async def test_U10_a_compression_bomb_passes_through_compressed_and_is_never_expanded(
    big_gateway: GatewayProcess, aiohttp_server: AiohttpServer
) -> None:
    bomb = gzip_bomb(512 * MIB)
    assert len(bomb) < MIB

    async def zipped(request: web.Request) -> web.Response:
        return web.Response(
            body=bomb, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )

    app = web.Application()
    app.router.add_post("/v1/bomb", zipped)
    await serve_on_fixed_port(aiohttp_server, app)
    status, body, grew = await stalled_read(
        big_gateway, f"{AGENT}/bomb", headers={"Accept-Encoding": "gzip"}
    )
    assert status == 200
    assert body == bomb, "the gateway re-encoded (so decompressed) the body"
    assert grew < RSS_GROWTH_BOUND
    assert big_gateway.get_status("/healthz") == 200


async def test_U10_the_gateway_process_still_serves_sessions_after_the_floods(
    big_gateway: GatewayProcess,
) -> None:
    """Nothing lost in the process that relayed the floods: sessions still work."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(big_gateway.url, cookie_jar=jar) as http:
        async with http.patch(SESSION, json={"keep": 1}, headers=CSRF) as resp:
            assert resp.status == 200
        async with http.get(SESSION) as resp:
            assert await resp.json() == {"data": {"keep": 1}}
