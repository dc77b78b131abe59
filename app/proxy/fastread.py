"""Fast reads of an upstream body: aiohttp's `StreamReader` internals, fenced here.

`take_buffered` and `read_available` are `read_nowait` and `read` that take every buffered HTTP
chunk in one step; `wait_readable` and `wake` are a wait for bytes that another callback can end
early, so a relay needs no timer per wait (app/proxy/relay.py). No other module touches
aiohttp's underscore names.
"""

from __future__ import annotations

import aiohttp

# The `StreamReader` internals `take_buffered` and `read_available` rely on (aiohttp 3.14). With
# another aiohttp whose reader lacks any of them, both use aiohttp's public path only.
_READER_FIELDS = frozenset(
    {"_buffer", "_buffer_offset", "_size", "_cursor", "_http_chunk_splits", "_low_water"}
    | {"_low_water_chunks", "_protocol", "_timer", "_exception", "_waiter", "_eof"}
)
FAST_READS = set(getattr(aiohttp.StreamReader, "__slots__", ())) >= _READER_FIELDS and all(
    callable(getattr(aiohttp.StreamReader, name, None)) for name in ("_wait", "_read_nowait")
)


def take_buffered(content: aiohttp.StreamReader, limit: int) -> bytes:
    """`content.read_nowait(limit)` in one step: the bytes `content` holds now (at most
    `limit`), `b""` when there are none; raises the stream's exception like `read_nowait`.

    aiohttp's `read_nowait` takes one buffered HTTP chunk at a time and asks the connection to
    resume reading after each (a parser call every time): about 1 µs per buffered event, most
    of a relay's read cost when an event stream arrives in bursts. Here the buffer is joined
    at once and the connection resumed once, after it; bytes that this feeds (a paused
    parser's backlog) are left for the next call instead of joining this one. Uses aiohttp's
    `StreamReader` internals (checked against `read_nowait` by tests/test_proxy_fast_relay.py);
    anything unusual (another reader class, an error, a pending waiter, more than `limit`
    bytes, a single chunk) takes aiohttp's own path.
    """
    if (
        not FAST_READS
        or type(content) is not aiohttp.StreamReader  # e.g. the empty body of a HEAD answer
        or content._exception is not None
        or content._waiter is not None
    ):
        return content.read_nowait(limit)
    return _join_buffered(content, limit)


def _join_buffered(content: aiohttp.StreamReader, limit: int) -> bytes:
    """aiohttp's `content._read_nowait(limit)` (no error check), one join for several chunks."""
    buffer = content._buffer
    if len(buffer) < 2 or content._size > limit:
        return content._read_nowait(limit)
    content._timer.assert_timeout()
    offset = content._buffer_offset
    if offset:
        buffer[0] = buffer[0][offset:]
        content._buffer_offset = 0
    data = b"".join(buffer)
    buffer.clear()
    content._size -= len(data)
    content._cursor += len(data)
    splits = content._http_chunk_splits
    if splits is not None:
        cursor = content._cursor
        while splits and splits[0] < cursor:
            splits.popleft()
    if content._size < content._low_water and (
        splits is None or len(splits) < content._low_water_chunks
    ):
        content._protocol.resume_reading()
    return data


async def read_available(content: aiohttp.StreamReader, limit: int) -> bytes:
    """`await content.read(limit)`: wait until `content` has bytes (or its end), then take them
    like `take_buffered` (one join, not one step per HTTP chunk that arrived meanwhile). Waits
    with aiohttp's own `_wait` and takes without an error check, exactly as `read` does;
    another reader class or a stored error takes `read` itself."""
    if (
        not FAST_READS
        or type(content) is not aiohttp.StreamReader
        or content._exception is not None
    ):
        return await content.read(limit)
    while not content._buffer and not content._eof:
        await content._wait("read")
    return _join_buffered(content, limit)


def can_wake(content: aiohttp.StreamReader) -> bool:
    """True when `wait_readable`/`wake` work on `content` (aiohttp's own reader, with the
    internals this module knows, and no stored error); else the caller waits through the public
    `read` under a timeout (the fallback)."""
    return FAST_READS and type(content) is aiohttp.StreamReader and content._exception is None


async def wait_readable(content: aiohttp.StreamReader) -> None:
    """Wait until `content` has bytes or its end, or until `wake(content)` is called (then it
    returns with nothing to read); reads nothing. Raises what aiohttp's `_wait` raises (a
    connection closed, the stream's error). Only where `can_wake(content)`."""
    if content._buffer or content._eof:
        return
    await content._wait("read")


def wake(content: aiohttp.StreamReader) -> None:
    """End a pending `wait_readable` on `content` now, as if bytes had come (none did); nothing
    when no wait is pending. What aiohttp's `feed_data` does to the waiter, minus the data."""
    waiter = content._waiter
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
