"""A small asyncio TCP fault proxy ("toxiproxy in 200 lines") for Redis and upstream agents.

`FaultProxy(target_port)` listens on `127.0.0.1:<free port>` and forwards every connection to
`127.0.0.1:<target_port>`. Faults ("toxics") are plain attributes, changed at any time; each
applies to the bytes that pass *after* the change, on every open and future connection:

- `latency` (seconds): each chunk waits this long before it is forwarded (both directions, or
  only `latency_direction` = `"up"` client->server / `"down"` server->client).
- `black_hole`: bytes are read and dropped in both directions; new connections are accepted
  and never connected onward. Nothing is closed: only a timeout ends a wait (a partition, a
  frozen peer).
- `drip`: `(n_bytes, interval)`: server->client bytes trickle `n_bytes` at a time.
- `close_after` / `reset_after` (bytes server->client per connection): once that many bytes
  were forwarded, the client side is closed cleanly (FIN) or reset (RST, `SO_LINGER` 0), and
  the server side closed. The byte budget cuts exactly: the chunk that crosses it is split.
- `refuse`: new connections are reset at once (as a port nothing listens on, seen from the
  client after `connect()` succeeded).
- `reset_all()` resets every open connection now (a dropped TCP session, `CLIENT KILL` from
  the network's point of view); `close_all()` closes them cleanly (FIN) instead.
- `hold_if(chunk) -> bool`: a client->server chunk for which it is true is held (not dropped)
  until `release()`; `held` is set once something is held. Makes "this write arrives late"
  deterministic (e.g. hold a replica's `SET` while another replica logs the session out).

Counters: `accepted`, `open_connections`, `bytes_up`, `bytes_down`; `wait_closed_all()`
waits until no connection is open (a gateway released everything it held).

Use as `async with FaultProxy(port) as proxy:`; `proxy.port` is what the client connects to.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

Direction = Literal["both", "up", "down"]
_CHUNK = 64 * 1024


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's stream and (unless black-holed) the target's."""

    client_reader: asyncio.StreamReader
    client_writer: asyncio.StreamWriter
    server_writer: asyncio.StreamWriter | None = None
    down_bytes: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER on, zero timeout, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """TCP proxy with switchable faults in front of `127.0.0.1:target_port`."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.latency = 0.0
        self.latency_direction: Direction = "both"
        self.black_hole = False
        self.drip: tuple[int, float] | None = None
        self.close_after: int | None = None
        self.reset_after: int | None = None
        self.refuse = False
        self.hold_if: Callable[[bytes], bool] | None = None
        self.held = asyncio.Event()
        self._released = asyncio.Event()
        self.accepted = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the proxy first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        links = list(self._links)
        tasks = [t for link in links for t in link.tasks]
        for link in links:
            self._close_link(link, rst=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- faults and observations ------------------------------------------------------------

    def heal(self) -> None:
        """Every toxic off (open connections carry on normally from now)."""
        self.latency = 0.0
        self.black_hole = False
        self.drip = None
        self.close_after = None
        self.reset_after = None
        self.refuse = False
        self.release()

    def release(self) -> None:
        """Let held chunks through (and stop holding new ones)."""
        self.hold_if = None
        self._released.set()

    def reset_all(self) -> int:
        """RST every open connection (both sides); returns how many there were."""
        links = list(self._links)
        for link in links:
            self._close_link(link, rst=True)
        return len(links)

    def close_all(self) -> int:
        """Close every open connection cleanly (FIN, both sides); returns how many."""
        links = list(self._links)
        for link in links:
            self._close_link(link, rst=False)
        return len(links)

    @property
    def open_connections(self) -> int:
        return len(self._links)

    async def wait_closed_all(self, timeout: float = 5.0) -> None:
        """Wait until every proxied connection is closed (raises TimeoutError)."""
        async with asyncio.timeout(timeout):
            while self._links:
                await asyncio.sleep(0.02)

    # -- plumbing ---------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refuse:
            _reset(writer)
            return
        link = _Link(reader, writer)
        self._links.add(link)
        if not self.black_hole:
            try:
                server_reader, link.server_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                self._close_link(link, rst=True)
                return
            link.tasks.append(asyncio.current_task())  # type: ignore[arg-type]
            up = asyncio.create_task(self._pump(link, reader, link.server_writer, "up"))
            link.tasks.append(up)
            try:
                await self._pump(link, server_reader, writer, "down")
            finally:
                with contextlib.suppress(asyncio.CancelledError):
                    await up
        else:
            # Accepted, never connected onward: read and drop until the client gives up.
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while await reader.read(_CHUNK):
                    pass
            self._close_link(link, rst=False)

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Literal["up", "down"],
    ) -> None:
        try:
            while not link.closed:
                chunk = await reader.read(_CHUNK)
                if not chunk:
                    break
                if self.black_hole:
                    continue  # dropped: the peer waits for bytes that never come
                if self.latency and self.latency_direction in ("both", direction):
                    await asyncio.sleep(self.latency)
                if direction == "up":
                    if self.hold_if is not None and self.hold_if(chunk):
                        self.held.set()
                        await self._released.wait()
                    self.bytes_up += len(chunk)
                    writer.write(chunk)
                    await writer.drain()
                    continue
                await self._forward_down(link, chunk, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if direction == "down" or link.closed:
                self._close_link(link, rst=False)
            elif writer.can_write_eof():
                # The client half-closed: pass the FIN on, keep reading the answer.
                with contextlib.suppress(OSError):
                    writer.write_eof()

    async def _forward_down(self, link: _Link, chunk: bytes, writer: asyncio.StreamWriter) -> None:
        cut = self.reset_after if self.reset_after is not None else self.close_after
        if cut is not None:
            room = max(cut - link.down_bytes, 0)
            if room < len(chunk):
                chunk = chunk[:room]
                await self._write_down(link, chunk, writer)
                await asyncio.sleep(0.05)  # let the allowed bytes reach the client first
                self._close_link(link, rst=self.reset_after is not None)
                return
        await self._write_down(link, chunk, writer)

    async def _write_down(self, link: _Link, chunk: bytes, writer: asyncio.StreamWriter) -> None:
        if not chunk:
            return
        pieces = [chunk]
        if self.drip is not None:
            size, _ = self.drip
            pieces = [chunk[i : i + size] for i in range(0, len(chunk), size)]
        for piece in pieces:
            if self.drip is not None:
                await asyncio.sleep(self.drip[1])
            if link.closed:
                return
            writer.write(piece)
            link.down_bytes += len(piece)
            self.bytes_down += len(piece)
            await writer.drain()

    def _close_link(self, link: _Link, *, rst: bool) -> None:
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        if rst:
            _reset(link.client_writer)
        else:
            link.client_writer.close()
        if link.server_writer is not None:
            if rst:
                _reset(link.server_writer)
            else:
                link.server_writer.close()
