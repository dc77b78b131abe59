"""The relay: an upstream answer streamed to the browser as it arrives, with SSE keep-alives
between events, and a failure after the response started framed so the browser can tell it
from a normal end (`event: error` between two events of an event stream, else an abort).

The browser's side fails one way: a `ConnectionError` from a write, which ends the relay and
marks the exchange (`Exchange.lose_client`) in one place, `relay`. The upstream's side fails
as a typed error (app/proxy/errors.py) rendered by `_fail`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from app.errors import BodyTooLarge, FixedError
from app.proxy.errors import ShuttingDown, UpstreamIdleTimeout, UpstreamStreamError
from app.proxy.exchange import Exchange
from app.proxy.fastread import (
    can_wake,
    read_available,
    take_buffered,
    wait_readable,
    wake,
)
from app.proxy.headers import browser_response_headers, is_event_stream
from app.request_metrics import record_upstream_error
from app.upstream import StreamStop

log = logging.getLogger(__name__)

# Largest single read from the upstream; bounds what one relay step holds in memory.
READ_CHUNK_BYTES = 64 * 1024

KEEPALIVE_COMMENT = b": keep-alive\n\n"
# What a read of the upstream's body raises when it breaks off. RuntimeError: aiohttp's C
# response parser, on bad chunk framing mid-body, drops the connection without failing the
# payload; the next read raises RuntimeError("Connection closed.").
_UPSTREAM_ERRORS = (aiohttp.ClientError, OSError, RuntimeError)


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


class _Alarm:
    """One relay's wake-up for its idle/keep-alive deadline: a lazy timer, not one per wait.

    `arm(deadline)` records the deadline of the wait about to start; a timer is scheduled only
    when none is pending. A relay's deadline never moves earlier (it is the last data or write
    plus a constant), so a pending timer fires no later than needed: when it fires before the
    current deadline (data came since it was set) it re-arms itself for that deadline, and when
    the deadline has come it ends the wait (`wake`). An event stream's relay thus schedules one
    timer per keep-alive interval, not one per event (as `asyncio.timeout` per wait did).
    """

    __slots__ = ("_content", "_deadline", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, content: aiohttp.StreamReader) -> None:
        self._loop = loop
        self._content = content
        self._deadline = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, deadline: float) -> None:
        self._deadline = deadline
        if self._handle is None:
            self._handle = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        if self._loop.time() < self._deadline:
            self._handle = self._loop.call_at(self._deadline, self._fire)
            return
        self._handle = None
        wake(self._content)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


async def relay(
    exchange: Exchange,
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    stop: StreamStop,
) -> None:
    """Relay `upstream`'s answer on `response` until it ends, fails (`_fail`) or the browser
    is gone (recorded on `exchange`, not raised)."""
    response.set_status(upstream.status, upstream.reason)
    response.headers.extend(browser_response_headers(upstream.headers, exchange.app.relay))
    sse = is_event_stream(upstream.headers)
    if sse or "Content-Length" not in upstream.headers:
        # Streamed answers must not sit in an nginx buffer (X-Accel-Buffering is nginx's
        # per-response switch for proxy_buffering).
        response.headers["X-Accel-Buffering"] = "no"
    if sse:
        response.headers.setdefault("Cache-Control", "no-cache")
    boundary = _SseBoundary()
    try:
        # The head may be held back (fastread.relay_response): it goes out with the first bytes
        # when they are already here, and on its own (`send_headers()`) before anything else.
        writer = await response.prepare(exchange.request)
        assert writer is not None
        failure = await _stream(exchange, response, writer, upstream.content, stop, sse, boundary)
        if failure is not None:
            await _fail(exchange, response, writer, sse, boundary, *failure)
    except ConnectionError:
        # Only the browser's side raises it here: `_stream` catches the upstream's errors.
        exchange.lose_client()


async def _stream(
    exchange: Exchange,
    response: web.StreamResponse,
    writer: AbstractStreamWriter,
    content: aiohttp.StreamReader,
    stop: StreamStop,
    sse: bool,
    boundary: _SseBoundary,
) -> tuple[FixedError, str] | None:
    """Copy `content` to `response`: None once the answer ended normally, else why it could
    not (the error and a detail for the log). A failed write raises `ConnectionError`.

    One reader loop, no task or wait set per chunk: whatever the upstream already delivered
    is taken without waiting (several buffered events go out in one write; the last bytes of
    a complete body go out with its end); only an empty buffer waits, under one deadline
    (idle timeout, or the next keep-alive of an event stream). The shutdown signal
    (`stop_streams`, via `stop`) cuts that wait short. On aiohttp's own reader the wait is
    ended by the relay's `_Alarm` (one lazy timer); otherwise by `asyncio.timeout` per wait.
    """
    loop = asyncio.get_running_loop()
    idle_timeout = exchange.app.idle_timeout_seconds
    keepalive = exchange.settings.sse_keepalive_seconds
    alarm = _Alarm(loop, content) if can_wake(content) else None
    waiting: list[asyncio.Timeout] = []  # the fallback's wait in progress, for `on_stop`

    def on_stop() -> None:
        if alarm is not None:
            wake(content)
        for timeout in waiting:
            if not timeout.expired():
                timeout.reschedule(loop.time())

    stop.subscribe(on_stop)
    last_data = last_write = loop.time()
    taken, exchange.taken = exchange.taken, b""
    try:
        while True:
            if stop.is_set:
                return ShuttingDown(), "shutdown timeout"
            chunk: bytes | None
            try:
                chunk, taken = taken or take_buffered(content, READ_CHUNK_BYTES), b""
                wait = not chunk and not content.is_eof()
            except _UPSTREAM_ERRORS as err:
                return _broke_off(exchange, err)
            if wait:
                writer.send_headers()  # if still held back: nothing is ready to go with it
                deadline = last_data + idle_timeout
                if sse:
                    deadline = min(deadline, last_write + keepalive)
                chunk = None
                if deadline > loop.time():
                    try:
                        if alarm is not None:
                            alarm.arm(deadline)
                            await wait_readable(content)
                            # Empty without the end: woken by the alarm or the stop signal.
                            chunk = take_buffered(content, READ_CHUNK_BYTES)
                            if not chunk and not content.is_eof():
                                chunk = None
                        else:
                            async with asyncio.timeout_at(deadline) as timeout:
                                waiting.append(timeout)
                                try:
                                    chunk = await read_available(content, READ_CHUNK_BYTES)
                                finally:
                                    waiting.clear()
                    except TimeoutError:
                        chunk = None
                    except _UPSTREAM_ERRORS as err:
                        return _broke_off(exchange, err)
            if chunk is not None:
                if not chunk:
                    break
                if content.at_eof():
                    # The body is complete: its last bytes and its end in one send.
                    await response.write_eof(chunk)
                    return None
                await response.write(chunk)  # awaits the drain: the browser's pace
                boundary.feed(chunk)
                last_data = last_write = loop.time()
                continue
            # The wait ended without data: shutdown, idle timeout or keep-alive time.
            if stop.is_set:
                continue
            now = loop.time()
            if now >= last_data + idle_timeout:
                return UpstreamIdleTimeout(), "idle timeout"
            if sse and now >= last_write + keepalive:
                # Not while the browser is not reading: the comment would only pile up in
                # the write buffer (and a stalled reader needs no keep-alive).
                if boundary.at_boundary and not exchange.request.protocol.writing_paused:
                    await response.write(KEEPALIVE_COMMENT)
                    boundary.feed(KEEPALIVE_COMMENT)
                last_write = now
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return None
    finally:
        stop.unsubscribe(on_stop)
        if alarm is not None:
            alarm.cancel()


def _broke_off(exchange: Exchange, err: BaseException) -> tuple[FixedError, str]:
    """Why the upstream's body ended early: 413 when the browser's body was cut at its cap
    (the upstream saw it end), else `upstream_stream_error`."""
    if isinstance(exchange.upload_error, BodyTooLarge):
        return BodyTooLarge(), type(err).__name__
    return UpstreamStreamError(), type(err).__name__


async def _fail(
    exchange: Exchange,
    response: web.StreamResponse,
    writer: AbstractStreamWriter,
    sse: bool,
    boundary: _SseBoundary,
    error: FixedError,
    detail: str,
) -> None:
    """End a started response so the browser can tell it from a normal end: an event stream
    between two events gets `event: error` (the error's code and message) and ends; anything
    else is aborted after its head."""
    code = error.code
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
        payload = {"code": code, "message": error.message, "request_id": exchange.request_id}
        await response.write(f"event: error\ndata: {json.dumps(payload)}\n\n".encode())
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return
    transport = exchange.request.transport
    if transport is not None:
        try:
            writer.send_headers()  # the browser sees the response start, then the cut
        finally:
            transport.abort()
