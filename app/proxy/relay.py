"""The relay: an upstream answer streamed to the browser as it arrives, with SSE keep-alives
between events, and a failure after the response started framed so the browser can tell it
from a normal end (`event: error` between two events of an event stream, else an abort).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from app.metrics import record_upstream_error
from app.proxy.exchange import Exchange
from app.proxy.fastread import read_available, take_buffered
from app.proxy.headers import browser_response_headers, is_event_stream
from app.upstream import StreamStop

log = logging.getLogger(__name__)

# Largest single read from the upstream; bounds what one relay step holds in memory.
READ_CHUNK_BYTES = 64 * 1024

KEEPALIVE_COMMENT = b": keep-alive\n\n"


class _SseBoundary:
    """Tracks whether the bytes sent so far end between two SSE events.

    An event (`event: error` or a keep-alive comment) may only be added there: injected into a
    half-written event it would corrupt both.
    """

    __slots__ = ("tail",)
    _ENDS = (b"\n\n", b"\r\r", b"\n\r", b"\r\n\r\n", b"\r\r\n")

    def __init__(self) -> None:
        self.tail = b"\n\n"

    def feed(self, chunk: bytes) -> None:
        self.tail = (self.tail + chunk[-4:])[-4:]

    @property
    def at_boundary(self) -> bool:
        return self.tail.endswith(self._ENDS)


class RelayResponse(web.StreamResponse):
    """The relayed response. `prepare()` holds its head back until the first write (aiohttp
    sends it together with those bytes); `relay` sends it on its own (`_send_head`) as soon as
    no body bytes are ready, so the head never waits for the upstream."""

    _send_headers_immediately = False


async def relay(
    exchange: Exchange,
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    stop: StreamStop,
) -> None:
    request = exchange.request
    response.set_status(upstream.status, upstream.reason)
    response.headers.extend(browser_response_headers(upstream.headers, exchange.app.relay))
    sse = is_event_stream(upstream.headers)
    if sse or "Content-Length" not in upstream.headers:
        # Streamed answers must not sit in an nginx buffer (X-Accel-Buffering is nginx's
        # per-response switch for proxy_buffering).
        response.headers["X-Accel-Buffering"] = "no"
    if sse:
        response.headers.setdefault("Cache-Control", "no-cache")
    try:
        # The head is held back (`RelayResponse`): it goes out with the first bytes when they
        # are already here, and on its own (`_send_head`) before anything else happens.
        writer = await response.prepare(request)
    except ConnectionError:
        exchange.client_gone = True
        return
    assert writer is not None

    # One reader loop, no task or wait set per chunk: whatever the upstream already delivered
    # is taken without waiting (several buffered events go out in one write; the last bytes of
    # a complete body go out with its end); only an empty buffer waits, under one deadline
    # (idle timeout, or the next keep-alive of an event stream). The shutdown signal
    # (`stop_streams`, via `stop`) cuts that wait short.
    loop = asyncio.get_running_loop()
    content = upstream.content
    boundary = _SseBoundary()
    idle_timeout = exchange.app.idle_timeout_seconds
    keepalive = exchange.settings.sse_keepalive_seconds
    waiting: list[asyncio.Timeout] = []  # the wait in progress, for the stop callback

    def on_stop() -> None:
        for timeout in waiting:
            if not timeout.expired():
                timeout.reschedule(loop.time())

    stop.subscribe(on_stop)
    last_data = last_write = loop.time()
    try:
        while True:
            if stop.is_set:
                await _fail(
                    exchange, response, writer, sse, boundary, "shutting_down", "shutdown timeout"
                )
                return
            chunk: bytes | None
            try:
                chunk = take_buffered(content, READ_CHUNK_BYTES)
                if not chunk and not content.is_eof():
                    if not _send_head(exchange, writer):
                        return
                    deadline = last_data + idle_timeout
                    if sse:
                        deadline = min(deadline, last_write + keepalive)
                    chunk = None
                    if deadline > loop.time():
                        try:
                            async with asyncio.timeout_at(deadline) as timeout:
                                waiting.append(timeout)
                                try:
                                    chunk = await read_available(content, READ_CHUNK_BYTES)
                                finally:
                                    waiting.clear()
                        except TimeoutError:
                            chunk = None
            # RuntimeError: aiohttp's C response parser, on bad chunk framing mid-body,
            # drops the connection without failing the payload; the next read raises
            # RuntimeError("Connection closed.").
            except (aiohttp.ClientError, OSError, RuntimeError) as err:
                code = "body_too_large" if exchange.body_too_large else "upstream_stream_error"
                await _fail(exchange, response, writer, sse, boundary, code, type(err).__name__)
                return
            if chunk is not None:
                if not chunk:
                    break
                if content.at_eof():
                    # The body is complete: its last bytes and its end in one send.
                    try:
                        await response.write_eof(chunk)
                    except ConnectionError:
                        exchange.client_gone = True
                    return
                if not await _write(exchange, response, chunk):
                    return
                boundary.feed(chunk)
                last_data = last_write = loop.time()
                continue
            # The wait ended without data: shutdown, idle timeout or keep-alive time.
            if stop.is_set:
                continue
            now = loop.time()
            if now >= last_data + idle_timeout:
                await _fail(
                    exchange,
                    response,
                    writer,
                    sse,
                    boundary,
                    "upstream_idle_timeout",
                    "idle timeout",
                )
                return
            if sse and now >= last_write + keepalive:
                # Not while the browser is not reading: the comment would only pile up in
                # the write buffer (and a stalled reader needs no keep-alive).
                if boundary.at_boundary and not request.protocol.writing_paused:
                    if not await _write(exchange, response, KEEPALIVE_COMMENT):
                        return
                    boundary.feed(KEEPALIVE_COMMENT)
                last_write = now
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
    finally:
        stop.unsubscribe(on_stop)


def _send_head(exchange: Exchange, writer: AbstractStreamWriter) -> bool:
    """Send the response head now if it is still held back; False when the browser is gone."""
    try:
        writer.send_headers()
    except ConnectionError:
        exchange.client_gone = True
        return False
    return True


async def _write(exchange: Exchange, response: web.StreamResponse, data: bytes) -> bool:
    """Write (awaiting drain: the browser's pace); False when the browser is gone."""
    try:
        await response.write(data)
    except ConnectionError:
        exchange.client_gone = True
        return False
    return True


_ERROR_MESSAGES = {
    "upstream_stream_error": "The agent service stream broke off.",
    "upstream_idle_timeout": "The agent service sent nothing for too long.",
    "shutting_down": "This instance is shutting down; retry.",
    "body_too_large": "The request body is too large.",
}


async def _fail(
    exchange: Exchange,
    response: web.StreamResponse,
    writer: AbstractStreamWriter,
    sse: bool,
    boundary: _SseBoundary,
    code: str,
    detail: str,
) -> None:
    """End a started response so the browser can tell it from a normal end."""
    if code.startswith("upstream_"):
        record_upstream_error(exchange.request, code.removeprefix("upstream_"))
    log.warning(
        "agent stream ended early: %s (%s; app %s, request %s)",
        code,
        detail,
        exchange.app.app_id,
        exchange.request_id,
    )
    response.force_close()
    if sse and boundary.at_boundary:
        payload = {
            "code": code,
            "message": _ERROR_MESSAGES.get(code, code),
            "request_id": exchange.request_id,
        }
        event = f"event: error\ndata: {json.dumps(payload)}\n\n".encode()
        if await _write(exchange, response, event):
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        return
    transport = exchange.request.transport
    if transport is not None:
        _send_head(exchange, writer)  # the browser sees the response start, then the cut
        transport.abort()
