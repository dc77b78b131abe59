"""aiohttp's private internals on the relay's hot path, fenced: the only module of the gateway
that touches aiohttp underscore names (tests/test_fences.py checks the rest of app/).

Two fast paths, each with aiohttp's public API as the other path:
- reads (`take_buffered`, `read_available`): aiohttp's `read_nowait`/`read` take one buffered
  HTTP chunk at a time and ask the connection to resume reading after each (a parser call
  every time): about 1 us per buffered event, most of a relay's read cost when an event stream
  arrives in bursts. Here the buffer is joined at once and the connection resumed once, after
  it, through `StreamReader` fields (`_buffer`, `_size`, `_cursor`, `_protocol` ...). Public
  path: `content.read_nowait(limit)` and `await content.read(limit)`.
  One behaviour beyond speed: bytes that arrived before the connection failed are taken
  before the error is raised (aiohttp's public reads raise a stored error first and drop them:
  a run whose upstream sent its answer and was reset at once lost every event, attack-20;
  the public path keeps aiohttp's behaviour).
- waits (`can_wake`, `wait_readable`, `wake`): a wait for bytes that another callback can end
  early, so a relay needs no timer per wait (app/proxy/relay.py `_Alarm`). Public path: the
  relay waits with `read` under `asyncio.timeout`.
- the response head (`relay_response`): held back until the first body bytes, so that both
  leave in one write (a complete short answer: head, body and end in one), through
  `StreamResponse._send_headers_immediately`. Public path: a plain `web.StreamResponse`, whose
  head is sent by `prepare()`. Either way the relay sends a held head on its own as soon as no
  body bytes are ready (`send_headers()`, public), so the head never waits for the upstream.

Measured gain (why they exist), one bench run on the shared 2-core VM (2026-12-03): SSE 50x200 B
through the gateway (Redis session), 1,141 streams/s (median; 647 us CPU per stream) with
these fast paths against 966 (718 us) with both on aiohttp's public API, per-repetition
ratios 1.18, 1.18, 1.11 (+11 to +18%, -10% CPU). The public rows came from a second gateway
whose `use()` was forced off by a temporary switch, beside the default one, interleaved
(before the waits were added, 1e2d234: their own figures are in that commit):

    .venv/bin/python scripts/bench.py --rows sse_direct,sse_gateway,<public>,sse_nginx \
        --reps 3 --seconds 5

Switch: `FAST_PATHS=off` (Settings.fast_paths, set by `use` from create_app) forces the public
paths; `auto` (the default) takes the fast ones when `self_check()` passes, and logs why when
it does not (another aiohttp whose internals differ).
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

# The `StreamReader` internals the reads rely on (aiohttp 3.14).
_READER_FIELDS = frozenset(
    {"_buffer", "_buffer_offset", "_size", "_cursor", "_http_chunk_splits", "_low_water"}
    | {"_low_water_chunks", "_protocol", "_timer", "_exception", "_waiter", "_eof"}
)
_READER_METHODS = ("_wait", "_read_nowait")


def self_check() -> str | None:
    """None when the installed aiohttp has the internals the fast paths use and they behave as
    expected (a reader fed three HTTP chunks: `take_buffered` returns what `read_nowait`
    returns and leaves the same state), else why not."""
    reader = aiohttp.StreamReader
    missing = _READER_FIELDS - set(getattr(reader, "__slots__", ()))
    missing |= {name for name in _READER_METHODS if not callable(getattr(reader, name, None))}
    if missing:
        return f"aiohttp.StreamReader lacks {', '.join(sorted(missing))}"
    if not isinstance(vars(web.StreamResponse).get("_send_headers_immediately"), bool):
        return "aiohttp.web.StreamResponse lacks _send_headers_immediately"
    loop = asyncio.new_event_loop()
    try:
        fast, public = _fed_reader(loop), _fed_reader(loop)
        taken = _join_buffered(fast, 1 << 16)
        if taken != public.read_nowait(1 << 16) or _state(fast) != _state(public):
            return "aiohttp.StreamReader's buffer is not read as expected"
    except Exception as err:  # anything unexpected means: not the internals we know
        return f"aiohttp.StreamReader's internals differ ({type(err).__name__}: {err})"
    finally:
        loop.close()
    return None


class _Protocol:
    """Enough of a connection for a `StreamReader` (flow control is counted, not done)."""

    def __init__(self) -> None:
        self.resumed = 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        self.resumed += 1


def _fed_reader(loop: asyncio.AbstractEventLoop) -> aiohttp.StreamReader:
    reader = aiohttp.StreamReader(_Protocol(), 2**16, loop=loop)  # type: ignore[arg-type]
    for chunk in (b"data: 1\n\n", b"data: 22\n\n", b"data: 333\n\n"):
        reader.begin_http_chunk_receiving()
        reader.feed_data(chunk)
        reader.end_http_chunk_receiving()
    return reader


def _state(reader: aiohttp.StreamReader) -> tuple[object, ...]:
    return (
        reader._size,
        reader._cursor,
        reader._buffer_offset,
        len(reader._buffer),
        list(reader._http_chunk_splits or []),
    )


# Whether the fast paths run: set by the wiring (`use`); until then, whether the check passes
# (computed at the end of this module, once everything the check calls is defined).
ACTIVE = False


def use(fast: bool) -> bool:
    """Take the fast paths when `fast` (Settings.fast_paths) and `self_check()` passes, else
    aiohttp's public API (logged when the check failed). Returns whether they are taken."""
    global ACTIVE
    problem = self_check() if fast else None
    if problem is not None:
        log.warning("relay fast paths off, aiohttp's public API used instead: %s", problem)
    ACTIVE = fast and problem is None
    return ACTIVE


class _HeldHeadResponse(web.StreamResponse):
    """`prepare()` holds the head back until the first write (aiohttp sends it together with
    those bytes) or an explicit `send_headers()`."""

    _send_headers_immediately = False


def relay_response() -> web.StreamResponse:
    """The response a relayed answer is written to (module docstring: the head)."""
    return _HeldHeadResponse() if ACTIVE else web.StreamResponse()


def take_buffered(content: aiohttp.StreamReader, limit: int) -> bytes:
    """`content.read_nowait(limit)` in one step: the bytes `content` holds now (at most
    `limit`), `b""` when there are none; raises the stream's exception like `read_nowait`.

    Bytes that resuming the connection feeds (a paused parser's backlog) are left for the next
    call instead of joining this one. Anything unusual (the public path, another reader class,
    an error with nothing buffered, a pending waiter, more than `limit` bytes, a single chunk)
    takes aiohttp's own `read_nowait`. Bytes that arrived before a stored error are taken
    before it is raised (module docstring).
    """
    if (
        not ACTIVE
        or type(content) is not aiohttp.StreamReader  # e.g. the empty body of a HEAD answer
        or (content._exception is not None and not content._buffer)
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
    with aiohttp's own `_wait` and takes without an error check, exactly as `read` does; the
    public path, another reader class or a stored error with nothing buffered takes `read`
    itself."""
    if not ACTIVE or type(content) is not aiohttp.StreamReader:
        return await content.read(limit)
    if content._exception is not None:
        if content._buffer:  # what arrived before the error, first (module docstring)
            return _join_buffered(content, limit)
        return await content.read(limit)
    while not content._buffer and not content._eof:
        await content._wait("read")
    return _join_buffered(content, limit)


def can_wake(content: aiohttp.StreamReader) -> bool:
    """True when `wait_readable`/`wake` work on `content` (aiohttp's own reader, with the
    internals this module knows, and no stored error); else the caller waits through the public
    `read` under a timeout (the fallback)."""
    return ACTIVE and type(content) is aiohttp.StreamReader and content._exception is None


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


ACTIVE = self_check() is None
