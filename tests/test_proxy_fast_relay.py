"""The relay's fast paths: no task per stream for the shutdown signal or the disconnect
watch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import aiohttp
from aiohttp import web

from app.lifecycle import LIFECYCLE_KEY
from tests.conftest import CSRF
from tests.fake_upstream import RunningGateway, ServedUpstream, sse, start_sse

AGENT = "/apps/shop/agent"
EVENTS = [sse("token", {"i": i, "text": "x" * 150}) for i in range(40)]


def _tasks_running(name: str) -> int:
    return sum(
        1 for task in asyncio.all_tasks() if getattr(task.get_coro(), "__qualname__", "") == name
    )


async def test_open_streams_share_one_shutdown_waiter_and_no_watcher_task(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async def first_then_silence(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(EVENTS[0])
        await asyncio.sleep(60)
        return response

    upstream.fake.on("/v1/chat", first_then_silence)

    async def open_stream() -> AsyncGenerator[aiohttp.ClientResponse, None]:
        async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
            assert await resp.content.readexactly(len(EVENTS[0])) == EVENTS[0]
            yield resp

    streams = [open_stream() for _ in range(3)]
    responses = [await anext(s) for s in streams]
    assert _tasks_running("Event.wait") == 0  # no stop_streams waiter per stream
    assert _tasks_running("StreamStop._wait") == 1
    assert _tasks_running("_watch_disconnect") == 0
    gw.app[LIFECYCLE_KEY].stop_streams.set()
    for resp in responses:
        async with asyncio.timeout(5):
            rest = await resp.read()
        assert b"event: error" in rest and b"shutting_down" in rest
    for s in streams:
        await s.aclose()
