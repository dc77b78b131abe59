"""The browser's side of an exchange, watched without a task: a browser that disconnected,
or that accepts no byte of a waiting answer for `idle_timeout_seconds`, cancels the exchange
(`web.run_app` does not cancel handlers on disconnect, so the transport is watched here).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import sys
import termios

from aiohttp import web

from app.proxy.exchange import Exchange

log = logging.getLogger(__name__)

# How often an open exchange checks that the browser is still connected.
DISCONNECT_POLL_SECONDS = 0.25

# The ioctl that reads a TCP socket's unacknowledged send queue (Linux: SIOCOUTQ, the same
# number as TIOCOUTQ); None elsewhere.
_SIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None


def unacknowledged_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes the kernel holds for the peer that it has not acknowledged yet (Linux `SIOCOUTQ`);
    0 where that cannot be read. Called only for a connection whose writing is paused."""
    sock = transport.get_extra_info("socket")
    if sock is None or _SIOCOUTQ is None:
        return 0
    try:
        reply = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int.from_bytes(reply, sys.byteorder, signed=True)


class _Wheel:
    """One timer for every watch of an event loop: each `DISCONNECT_POLL_SECONDS` tick polls
    every open exchange, instead of one timer per exchange re-armed at each poll (a timer
    handle, a heap push and a callback per exchange every tick: 20,000 a second at 5,000 open
    streams). The wheel of a loop exists while it has watches."""

    __slots__ = ("handle", "loop", "watches")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.watches: dict[DisconnectWatch, None] = {}  # insertion-ordered set
        self.handle: asyncio.TimerHandle | None = None

    def add(self, watch: DisconnectWatch) -> None:
        self.watches[watch] = None
        if self.handle is None:
            self.handle = self.loop.call_later(DISCONNECT_POLL_SECONDS, self._tick)

    def discard(self, watch: DisconnectWatch) -> None:
        self.watches.pop(watch, None)
        if not self.watches:
            self._close()

    def _tick(self) -> None:
        """Poll every watch; one that fails is dropped (and logged), never the others: a
        raised poll must not end disconnect detection for every open stream."""
        self.handle = None
        for watch in list(self.watches):
            try:
                keep = watch.poll()
            except Exception:
                log.exception("disconnect watch failed; that request is no longer watched")
                keep = False
            if not keep:
                self.watches.pop(watch, None)
        if self.watches:
            self.handle = self.loop.call_later(DISCONNECT_POLL_SECONDS, self._tick)
        else:
            self._close()

    def _close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if _WHEELS.get(self.loop) is self:
            del _WHEELS[self.loop]


_WHEELS: dict[asyncio.AbstractEventLoop, _Wheel] = {}


class DisconnectWatch:
    """Every `DISCONNECT_POLL_SECONDS` until `inner` is done: when the browser's transport is
    gone or closing, mark the exchange `client_gone` and cancel `inner`. Polled by its loop's
    `_Wheel` (one timer for all exchanges), not a task or a timer of its own: nothing runs per
    request until a tick is due.

    A browser that stops reading is gone too: when its connection's writing stays paused (the
    gateway's write buffer above its high-water mark) and the browser accepts not one byte of
    it for the application's `idle_timeout_seconds`, the connection is aborted. Otherwise a
    client that never reads would hold its upstream slot and connection for as long as the
    upstream has bytes for it (app/capacity.py). A slow reader that accepts anything is fine.
    """

    __slots__ = ("_buffered", "_exchange", "_inner", "_stalled_since", "_transport", "_wheel")

    def __init__(self, exchange: Exchange, inner: asyncio.Task[web.StreamResponse]) -> None:
        self._exchange = exchange
        self._inner = inner
        # The connection's transport (the same for the request's whole life; closing once the
        # browser is gone): read once, not through `request.transport` at every poll.
        self._transport = exchange.request.transport
        self._stalled_since = 0.0  # while paused: since when the browser accepted nothing
        self._buffered = -1  # the write buffer's size at the last poll while paused, else -1
        loop = asyncio.get_running_loop()
        wheel = _WHEELS.get(loop)
        if wheel is None:
            wheel = _WHEELS[loop] = _Wheel(loop)
        self._wheel = wheel
        wheel.add(self)

    def poll(self) -> bool:
        """One check (at a tick of the wheel); False once there is nothing left to watch."""
        if self._inner.done():
            return False
        exchange = self._exchange
        transport = self._transport
        if transport is None or transport.is_closing():
            exchange.lose_client()
            self._inner.cancel()
            return False
        if exchange.request.protocol.writing_paused:
            # Paused, the relay adds (almost) nothing: what is still to be delivered (our
            # buffer plus the kernel's unacknowledged bytes) only shrinks as the browser
            # reads, so any shrinking is progress.
            loop = self._wheel.loop
            buffered = transport.get_write_buffer_size() + unacknowledged_bytes(transport)
            if self._buffered < 0 or buffered < self._buffered:
                self._stalled_since = loop.time()
            self._buffered = buffered
            if loop.time() - self._stalled_since >= exchange.app.idle_timeout_seconds:
                log.info(
                    "browser read nothing for %ss; connection closed (app %s, request %s)",
                    exchange.app.idle_timeout_seconds,
                    exchange.app.app_id,
                    exchange.request_id,
                )
                exchange.lose_client()
                transport.abort()
                self._inner.cancel()
                return False
        else:
            self._buffered = -1
        return True

    def cancel(self) -> None:
        self._wheel.discard(self)
