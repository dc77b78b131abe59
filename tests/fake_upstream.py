"""Helpers for the proxy tests: a fake upstream agent, a gateway served like `python -m app`,
and a raw HTTP/1.1 client for request targets no well-behaved client would send.

- `FakeUpstream`: an aiohttp app (serve it with `aiohttp_server`, which cancels handlers when
  the peer hangs up, like most agent servers). Every request is recorded (`seen`) before its
  handler runs; `on(path, handler)` installs a handler, the default echoes what it received as
  JSON. `cancelled` is set when a handler is cancelled because the gateway hung up.
- `run_gateway(settings)`: the real `create_app` on a real socket, with
  `handler_cancellation=False` exactly as `web.run_app` in `python -m app` (aiohttp's test
  server would cancel handlers on disconnect, hiding whether the gateway notices by itself).
- `raw_request(url, target, ...)`: one request over a plain socket, target bytes exactly as given.
- `sse_events(text)`: parse an event stream into `(event, data)` pairs (comments kept as
  `(":", text)`).
- `raw_upstream(head, body, ...)`: an upstream answering exact bytes, then closing or
  resetting its connection (answers no aiohttp server would send: cut, lying, close-delimited).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpServer
from yarl import URL

from app.applications import AppConfig
from app.config import Settings
from app.main import create_app
from tests.conftest import make_settings

UpstreamHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path_qs: str
    headers: CIMultiDict[str]
    body: bytes | None = None


class FakeUpstream:
    """A scriptable upstream agent that records what reaches it."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.seen: list[Seen] = []
        self.handlers: dict[str, UpstreamHandler] = {}
        self.cancelled = asyncio.Event()

    def on(self, path: str, handler: UpstreamHandler) -> None:
        """Serve `path` (the upstream's own path, e.g. `/v1/chat`) with `handler`."""
        self.handlers[path] = handler

    @property
    def last(self) -> Seen:
        assert self.seen, "the upstream received no request"
        return self.seen[-1]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.raw_path, request.headers.copy()))
        handler = self.handlers.get(request.path, self._echo)
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return response

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen[-1].body = body
        return web.json_response(
            {"method": request.method, "path": request.raw_path, "body_bytes": len(body)}
        )


@dataclass
class ServedUpstream:
    """A `FakeUpstream` on a real socket; `base` is the upstream base URL (with `/v1`)."""

    fake: FakeUpstream
    server: TestServer

    @property
    def base(self) -> URL:
        return self.server.make_url("/v1")


async def serve_upstream(aiohttp_server: AiohttpServer) -> ServedUpstream:
    fake = FakeUpstream()
    return ServedUpstream(fake=fake, server=await aiohttp_server(fake.app))


async def start_sse(request: web.Request, **headers: str) -> web.StreamResponse:
    """Prepare an SSE response on the upstream side."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
    )
    await response.prepare(request)
    return response


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def sse_events(text: str) -> list[tuple[str, str]]:
    """`(event, data)` per dispatched event, in order; comment lines as `(":", comment)`."""
    events: list[tuple[str, str]] = []
    kind, data = "", list[str]()
    for line in text.replace("\r\n", "\n").split("\n"):
        if line == "":
            if data:
                events.append((kind or "message", "\n".join(data)))
            kind, data = "", list[str]()
        elif line.startswith(":"):
            events.append((":", line[1:].strip()))
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
    return events


def app_settings(
    upstream: str | URL, env: Mapping[str, str] | None = None, **app_fields: Any
) -> Settings:
    """Test settings whose only application, `shop`, points at `upstream`."""
    app = AppConfig(app_id="shop", upstream=str(upstream).rstrip("/"), **app_fields)
    return dataclasses.replace(make_settings(dict(env or {})), apps={"shop": app})


@dataclass
class RunningGateway:
    app: web.Application
    url: URL
    client: aiohttp.ClientSession
    runner: web.AppRunner
    extra: dict[str, Any] = field(default_factory=dict)

    def connections(self) -> list[web.RequestHandler]:
        """The server side of the browser connections open right now."""
        server = self.runner.server
        return [] if server is None else list(server.connections)

    @property
    def port(self) -> int:
        port = self.url.port
        assert port is not None
        return port


@contextlib.asynccontextmanager
async def run_gateway(settings: Settings) -> AsyncIterator[RunningGateway]:
    """The gateway on `127.0.0.1:<free port>`, served as `python -m app` serves it."""
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=False, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = URL.build(scheme="http", host=host, port=port)
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP-address host
        async with aiohttp.ClientSession(base_url=url, cookie_jar=jar) as client:
            yield RunningGateway(app=app, url=url, client=client, runner=runner)
    finally:
        await runner.cleanup()


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes


async def raw_request(
    url: URL,
    target: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> RawResponse:
    """Send `method target HTTP/1.1` byte for byte and read the answer to the end.

    `Connection: close` is added unless `headers` has a `Connection` (then it must say close).
    """
    assert url.host is not None and url.port is not None
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {url.host}:{url.port}"]
        pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or [])
        lines += [f"{k}: {v}" for k, v in pairs]
        if not any(k.lower() == "connection" for k, _ in pairs):
            lines.append("Connection: close")
        if body:
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return parse_raw_response(raw)


async def send_and_read_head(
    host: str | None, port: int | None, data: bytes, *, timeout: float = 10.0
) -> tuple[bytes, bytes]:
    """Write `data` as is (say, a request whose body never arrives whole) and read one answer
    within `timeout`: (its head up to the blank line, its `Content-Length` body)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            assert length is not None, head
            body = await reader.readexactly(int(length.group(1)))
    finally:
        writer.close()
    return head, body


async def stall_and_time_close(
    host: str | None, port: int | None, data: bytes, *, timeout: float = 15.0
) -> tuple[bytes, float]:
    """Write `data` (a request whose body stops part way) and keep the connection open without
    sending more: (everything the gateway sent until it closed the connection, the seconds
    from the answer's first byte to that close). `timeout` bounds the whole wait."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            received = await reader.read(1)
            answered = loop.time()
            received += await reader.read()  # to EOF
            closed = loop.time()
    finally:
        writer.close()
    return received, closed - answered


def parse_raw_response(raw: bytes) -> RawResponse:
    """An HTTP/1.1 response read to the end of the connection: status, headers, body (a
    chunked body de-chunked)."""
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed.add(name.strip(), value.strip())
    if parsed.get("Transfer-Encoding", "").lower() == "chunked":
        payload = _unchunk(payload)
    return RawResponse(status=int(status_line.split()[1]), headers=parsed, body=payload)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


@contextlib.asynccontextmanager
async def raw_upstream(
    head: bytes, body: bytes, *, late: bool = False, reset: bool = False
) -> AsyncIterator[str]:
    """An upstream (its base URL, `/v1`) that reads each request whole, answers `head` and
    `body` byte for byte (in one write, or the body 50 ms after the head when `late`), then
    closes its connection, or resets it (`reset`: SO_LINGER 0, an RST)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", request)
        if length is not None:
            await reader.readexactly(int(length.group(1)))
        if late:
            writer.write(head)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(body)
            await writer.drain()
            await asyncio.sleep(0.05)
        else:
            writer.write(head + body)
            await writer.drain()
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    async with raw_server(handle) as url:
        yield url


@contextlib.asynccontextmanager
async def raw_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """An asyncio server on a free loopback port that runs `handle` for each connection (an
    upstream writing exact bytes); yields its `/v1` base URL."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    finally:
        server.close()
        await server.wait_closed()
