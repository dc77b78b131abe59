"""A run's events to one browser response: from this process's log (`follow_local`, a run
pumped here) or from Redis through the run's follower here (`follow_remote`, a run pumped by
another replica, or ended), with keep-alives while nothing comes, until the run ends, fails
(one `event: error`) or the browser leaves."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Iterator

from aiohttp import web

from app.keys import APP_CONFIG_KEY, REQUEST_ID_KEY, SETTINGS_KEY
from app.proxy.relay import KEEPALIVE_COMMENT
from app.runs.entries import Entry, next_catchup_count
from app.runs.readers import READ_COUNT, Follower
from app.runs.run import ERROR_MESSAGES, Run
from app.runs.runs import RunRegistry
from app.runs.store import RedisRunStore
from app.sessions.backend import StoreUnavailable

log = logging.getLogger(__name__)

PIECE_BYTES = 64 * 1024
"""What one `response.write` of a run's events sends at most (about). aiohttp's write drains
(waits while the transport is paused above its high-water mark) once more than 64 KiB went
out since the last drain, so a reader that reads slowly or not at all holds about one or two
pieces beyond that mark here, never a copy of the whole log it asked for."""


def _pieces(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """`chunks` joined and cut into pieces of at most `PIECE_BYTES` (a chunk over it in
    several), lazily: at most one piece exists beyond the chunks themselves."""
    buffered: list[bytes] = []
    size = 0
    for chunk in chunks:
        if len(chunk) <= PIECE_BYTES:  # most events: no slice, no copy
            parts: Iterable[bytes] = (chunk,)
        else:
            parts = (chunk[at : at + PIECE_BYTES] for at in range(0, len(chunk), PIECE_BYTES))
        for part in parts:
            if size + len(part) > PIECE_BYTES and buffered:
                yield b"".join(buffered)
                buffered.clear()
                size = 0
            buffered.append(part)
            size += len(part)
    if buffered:
        yield b"".join(buffered)


async def write_pieces(
    response: web.StreamResponse, chunks: Iterable[bytes], *, eof: bool = False
) -> None:
    """Write `chunks` to `response` in drained pieces (`_pieces`); with `eof`, the last piece
    goes with the end of the response in one send."""
    if isinstance(chunks, list) and sum(map(len, chunks)) <= PIECE_BYTES:  # one piece
        data = b"".join(chunks)
        if eof:
            await response.write_eof(data)
        elif data:
            await response.write(data)
        return
    last: bytes | None = None
    for piece in _pieces(chunks):
        if last is not None:
            await response.write(last)
        last = piece
    if eof:
        await response.write_eof(last or b"")
    elif last is not None:
        await response.write(last)


def _error_event(request: web.Request, code: str) -> bytes:
    payload = {
        "code": code,
        "message": ERROR_MESSAGES.get(code, code),
        "request_id": request[REQUEST_ID_KEY],
    }
    return f"event: error\ndata: {json.dumps(payload)}\n\n".encode()


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def follow_local(
    request: web.Request,
    response: web.StreamResponse,
    run: Run,
    after: int,
    registry: RunRegistry,
    *,
    resume: bool = False,
) -> None:
    """Send `run`'s events after `after` from this process's log, then the live ones, until
    the run ends or the browser leaves."""
    settings = request.app[SETTINGS_KEY]
    wait = min(settings.sse_keepalive_seconds, registry.heartbeat)
    keepalive = settings.sse_keepalive_seconds
    loop = asyncio.get_running_loop()
    last_write = loop.time()
    pos = after
    replay_until = run.log.next_seq - 1 if resume else 0
    try:
        if not response.prepared:
            writer = await response.prepare(request)
            if writer is not None and not run.log.after(pos):
                # One turn of the loop: the pump takes what the upstream sent already, which
                # then goes out with the head in one send. Nothing yet: the head goes alone
                # (X-Run-Id never waits for a first event).
                await asyncio.sleep(0)
                if not run.log.after(pos) and run.log.end is None:
                    writer.send_headers()
        while True:
            if pos + 1 < run.log.first_seq:
                await response.write(_error_event(request, "resume_too_old"))
                break
            chunks = run.log.after(pos)
            if chunks:
                if pos < replay_until:
                    registry.counters.replayed_events += min(len(chunks), replay_until - pos)
                pos += len(chunks)
                if run.log.end is not None and pos == run.log.next_seq - 1:
                    # The last events and the end of the response in one send.
                    await write_pieces(response, chunks, eof=True)
                    return
                await write_pieces(response, chunks)
                last_write = loop.time()
                continue
            if run.log.end is not None:
                break
            if not await run.log.wait(wait):
                if _gone(request):
                    return
                if loop.time() - last_write >= keepalive:
                    await response.write(KEEPALIVE_COMMENT)
                    last_write = loop.time()
        await response.write_eof()
    except ConnectionError:
        return


async def follow_remote(
    request: web.Request,
    response: web.StreamResponse,
    store: RedisRunStore,
    run_id: str,
    after: int,
    registry: RunRegistry,
    follower: Follower | None,
    replay_until: int,
    client: str,
) -> None:
    """The same from Redis, for a run pumped by another replica (or ended): what the run's
    follower here holds (app/runs/readers.py), and before that (a resume from further back,
    or an ended run: `follower` None) what `XRANGE` reads, a few entries at a time
    (`next_catchup_count`, in the catch-up gate's turn of `client`, the reader's address);
    events up to `replay_until` (an ended run), or read before the follower's (a live run),
    count as replayed."""
    settings = request.app[SETTINGS_KEY]
    app_id = request[APP_CONFIG_KEY].app_id
    keepalive = settings.sse_keepalive_seconds
    wait = min(keepalive, registry.heartbeat)
    loop = asyncio.get_running_loop()
    last_write = loop.time()
    pos = after
    count = 1  # the first catch-up read: one entry, then more while they are small
    try:
        while True:
            entries: list[Entry] = []
            catching_up = follower is None or pos < follower.base
            if follower is None or pos < follower.base:
                entries = await store.range_after(run_id, pos, count, app_id=app_id, client=client)
                count = next_catchup_count(count, entries, READ_COUNT)
                if not entries and follower is None:
                    if pos < replay_until:
                        # Its events expired before its meta (a run cut over its budget keeps
                        # its meta while it pumps on elsewhere): a 200 with no event made
                        # EventSource reconnect for ever (attack-14).
                        await response.write(_error_event(request, "resume_too_old"))
                    break  # an ended run read to its end
            else:
                entries = follower.after(pos)
            if not entries:
                assert follower is not None
                if follower.done and (follower.pos <= pos or pos < follower.base):
                    # Nothing more will come: it gave up, or what it had is gone from Redis.
                    code = follower.failure or "resume_too_old"
                    if code == "run_orphaned":
                        registry.counters.orphaned += 1
                    await response.write(_error_event(request, code))
                    break
                if not await follower.wait(wait):
                    if _gone(request):
                        return
                    if loop.time() - last_write >= keepalive:
                        await response.write(KEEPALIVE_COMMENT)
                        last_write = loop.time()
                continue
            out: list[bytes] = []
            ended = False
            before = pos
            for entry in entries:
                if entry.first > pos + 1:
                    out.append(_error_event(request, "resume_too_old"))
                    ended = True
                    break
                if entry.data is not None:
                    out.append(entry.after(pos))
                    pos = entry.seq
                if entry.end is not None:
                    ended = True
                    break
            if follower is not None and catching_up:  # a live run: from before its follower
                registry.counters.replayed_events += pos - before
            elif before < replay_until:
                registry.counters.replayed_events += min(pos, replay_until) - before
            if out:
                await write_pieces(response, out)
                last_write = loop.time()
            if ended:
                break
        await response.write_eof()
    except StoreUnavailable as err:
        log.warning("run %s: reading failed (%s)", run_id, err)
        try:
            await response.write(_error_event(request, "run_store_unavailable"))
            await response.write_eof()
        except ConnectionError:
            return
    except ConnectionError:
        return
