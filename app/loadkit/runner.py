"""Virtual users against a running gateway (or a load balancer in front of several).

Each virtual user (VU) is one browser: its own `aiohttp.ClientSession` and cookie jar, one
request at a time. It creates a session (`PATCH .../session`), then picks read (`GET`), write
(`PATCH`) or stream (`POST .../agent/<path>`, read as SSE) by the configured mix until the
duration or the request cap is reached, then verifies its session once more.

Session continuity: every VU remembers what it wrote (a random token and a counter) and checks
every session it reads back. A session that no longer holds the token is *lost* (expired,
evicted, flushed, or living on another replica); one holding the token but an older counter is
*stale* (a write went missing). Either is counted once and the VU re-creates its session.

It always stops by itself: no request starts after `duration`; in-flight requests get `grace`
seconds; then everything still running is cancelled (counted as `aborted`, not as errors).

Here: `run_load` (the users' lives, ramp-up, deadline). Beside it: `recording` (what a run is
asked to do and what it recorded), `user` (one virtual user's requests and checks), `streams`
(reading one SSE answer).
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Callable

import aiohttp

from app.loadkit.recording import LoadConfig, Recorder
from app.loadkit.user import Tickets, VirtualUser


async def run_load(
    config: LoadConfig,
    *,
    progress: Callable[[Recorder], None] | None = None,
    on_start: Callable[[Recorder], None] | None = None,
) -> Recorder:
    """Run `config` to completion (bounded by duration + grace) and return the recording.

    `progress` is called about once a second; `on_start` once, before the first request.
    """
    recorder = Recorder(config.duration)
    if on_start is not None:
        on_start(recorder)
    loop = asyncio.get_running_loop()
    begin = loop.time()
    end = begin + config.duration
    tickets = Tickets(config.max_requests)
    rng = random.Random(config.seed)
    users = [
        VirtualUser(i, config, recorder, random.Random(rng.random()))
        for i in range(config.concurrency)
    ]

    async def life(user: VirtualUser) -> None:
        delay = config.ramp_up * user.index / max(1, len(users))
        if delay:
            await asyncio.sleep(delay)
        jar = aiohttp.CookieJar(unsafe=True)  # the gateway is usually reached by IP here
        connector = aiohttp.TCPConnector(limit=2, ttl_dns_cache=300)
        async with aiohttp.ClientSession(cookie_jar=jar, connector=connector) as http:
            recorder.active_users += 1
            try:
                await user.run(http, end, tickets)
                if config.verify_at_end:
                    await user.verify(http)
            finally:
                recorder.active_users -= 1

    tasks = [asyncio.create_task(life(user)) for user in users]
    ticker = None
    if progress is not None:
        ticker = asyncio.create_task(_tick(recorder, progress))
    hard_deadline = config.duration + config.grace
    try:
        done, pending = await asyncio.wait(tasks, timeout=hard_deadline)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        recorder.aborted = len(pending)  # each VU has at most one request in flight
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                print(f"loadgen: a virtual user failed: {exc!r}", file=sys.stderr)
    finally:
        recorder.finished = recorder.now()
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
    return recorder


async def _tick(recorder: Recorder, progress: Callable[[Recorder], None]) -> None:
    while True:
        await asyncio.sleep(1.0)
        progress(recorder)
