"""Failures: fast and clear before the response starts (502/504), never a clean end after it
started (`event: error` or an aborted connection), browser disconnects cancel the upstream,
and shutdown ends open streams with `shutting_down`."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from app.keys import LIFECYCLE_KEY
from app.loadkit.ports import free_port
from app.proxy import fastread
from tests.conftest import CSRF, GatewayProcessFactory
from tests.fake_upstream import (
    RunningGateway,
    ServedUpstream,
    app_settings,
    run_gateway,
    sse,
    sse_events,
    start_sse,
)

AGENT = "/apps/shop/agent"


@pytest.fixture(autouse=True, params=["fast", "public"])
def relay_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here on both of the relay's paths (app/proxy/fastread.py): aiohttp's
    internals, and its public API (as when the start-up self-check fails)."""
    monkeypatch.setattr(fastread, "ACTIVE", fastread.ACTIVE)  # restored after the test
    if request.param == "public":
        monkeypatch.setattr(fastread, "self_check", lambda: "the public path, for this test")
    return str(request.param)


FIRST = sse("token", {"text": "first"})


@pytest.fixture
async def gw(upstream: ServedUpstream) -> AsyncIterator[RunningGateway]:
    settings = app_settings(upstream.base, connect_timeout_seconds=0.25, idle_timeout_seconds=0.25)
    async with run_gateway(settings) as gateway:
        yield gateway


def error_event(body: bytes) -> dict[str, str]:
    events = sse_events(body.decode())
    assert events[-1][0] == "error", events
    data: dict[str, str] = json.loads(events[-1][1])
    return data


async def first_event_then_silence(request: web.Request) -> web.StreamResponse:
    response = await start_sse(request)
    await response.write(FIRST)
    await asyncio.sleep(60)  # "the model is thinking"
    return response


# -- before the response starts: 502 / 504 --------------------------------------------------


async def test_upstream_refusing_connections_is_a_fast_502() -> None:
    settings = app_settings(f"http://127.0.0.1:{free_port()}/v1")
    async with run_gateway(settings) as gw:
        started = time.monotonic()
        async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
            assert resp.status == 502
            body = await resp.json()
        assert time.monotonic() - started < 2
    assert body["error"]["code"] == "upstream_unavailable"
    assert body["error"]["request_id"] == resp.headers["X-Request-Id"]
    assert resp.headers["Cache-Control"] == "no-store"


async def test_upstream_hanging_up_without_an_answer_is_a_502(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async def hang_up(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        raise asyncio.CancelledError

    upstream.fake.on("/v1/chat", hang_up)
    async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "upstream_unavailable"


async def test_no_response_headers_in_time_is_a_504_and_the_upstream_is_cancelled(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.Response()

    upstream.fake.on("/v1/chat", slow)
    started = time.monotonic()
    async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 3
    await asyncio.wait_for(upstream.fake.cancelled.wait(), timeout=5)


# -- after the response started: never a clean end -----------------------------------------


async def test_upstream_reset_between_events_ends_with_an_error_event(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async def reset(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(FIRST)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # no terminating chunk: a truncated body
        return response

    upstream.fake.on("/v1/chat", reset)
    async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert body.startswith(FIRST)
    error = error_event(body)
    assert error["code"] == "upstream_stream_error"
    assert error["request_id"] == resp.headers["X-Request-Id"]
    assert [e for e, _ in sse_events(body.decode())] == ["token", "error"]


async def test_upstream_reset_inside_an_event_aborts_the_browser_connection(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async def reset_mid_event(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(FIRST + b'event: token\ndata: {"te')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    upstream.fake.on("/v1/chat", reset_mid_event)
    async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


@pytest.mark.parametrize("declared_length", [False, True])
async def test_truncated_non_sse_bodies_abort_the_browser_connection(
    upstream: ServedUpstream, gw: RunningGateway, declared_length: bool
) -> None:
    async def truncated(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if declared_length:
            response.content_length = 1000
        await response.prepare(request)
        await response.write(b'{"partial": ')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    upstream.fake.on("/v1/data", truncated)
    async with gw.client.get(f"{AGENT}/data") as resp:
        assert resp.status == 200
        assert (resp.headers.get("Content-Length") == "1000") is declared_length
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_idle_upstream_stream_ends_with_an_idle_timeout_error_event(
    upstream: ServedUpstream,
) -> None:
    upstream.fake.on("/v1/chat", first_event_then_silence)
    # Keep-alives every 50 ms must not count as upstream activity.
    settings = app_settings(
        upstream.base, {"SSE_KEEPALIVE_SECONDS": "0.05"}, idle_timeout_seconds=0.25
    )
    async with run_gateway(settings) as gw:
        started = time.monotonic()
        async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
            body = await resp.read()
        assert time.monotonic() - started < 3
    assert body.startswith(FIRST)
    assert error_event(body)["code"] == "upstream_idle_timeout"
    assert (":", "keep-alive") in sse_events(body.decode())
    await asyncio.wait_for(upstream.fake.cancelled.wait(), timeout=5)


async def test_idle_non_sse_stream_aborts_the_browser_connection(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async def silent(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(b'{"n": 1}\n')
        await asyncio.sleep(60)
        return response

    upstream.fake.on("/v1/run", silent)
    async with gw.client.post(f"{AGENT}/run", headers=CSRF) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await asyncio.wait_for(upstream.fake.cancelled.wait(), timeout=5)


# -- the browser leaves ---------------------------------------------------------------------


async def test_browser_disconnect_cancels_a_silent_upstream_within_a_second_or_so(
    upstream: ServedUpstream,
) -> None:
    upstream.fake.on("/v1/chat", first_event_then_silence)
    # Long timeouts: only the disconnect can end this exchange.
    settings = app_settings(upstream.base, idle_timeout_seconds=120, connect_timeout_seconds=30)
    async with run_gateway(settings) as gw:
        resp = await gw.client.post(f"{AGENT}/chat", headers=CSRF)
        assert await resp.content.readexactly(len(FIRST)) == FIRST
        resp.close()  # the tab is closed
        left = time.monotonic()
        await asyncio.wait_for(upstream.fake.cancelled.wait(), timeout=10)
        assert time.monotonic() - left < 2, "the upstream ran on for nobody"
        lifecycle = gw.app[LIFECYCLE_KEY]
        async with asyncio.timeout(5):
            while lifecycle.in_flight:
                await asyncio.sleep(0.05)


async def test_browser_disconnect_before_the_response_started_cancels_the_upstream(
    upstream: ServedUpstream,
) -> None:
    async def thinks_before_answering(request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.Response()

    upstream.fake.on("/v1/chat", thinks_before_answering)
    settings = app_settings(upstream.base, connect_timeout_seconds=30)
    async with run_gateway(settings) as gw:
        request = asyncio.create_task(gw.client.post(f"{AGENT}/chat", headers=CSRF))
        async with asyncio.timeout(5):
            while not upstream.fake.seen:
                await asyncio.sleep(0.02)
        request.cancel()  # the browser gives up while the upstream has said nothing
        left = time.monotonic()
        await asyncio.wait_for(upstream.fake.cancelled.wait(), timeout=10)
        assert time.monotonic() - left < 2


# -- shutdown -------------------------------------------------------------------------------


async def test_streams_open_at_the_shutdown_timeout_end_with_shutting_down(
    upstream: ServedUpstream,
) -> None:
    upstream.fake.on("/v1/chat", first_event_then_silence)
    settings = app_settings(upstream.base, {"SHUTDOWN_TIMEOUT_SECONDS": "0.3"})
    async with run_gateway(settings) as gw:
        async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
            assert await resp.content.readexactly(len(FIRST)) == FIRST
            await gw.app[LIFECYCLE_KEY].drain()  # what SIGTERM runs; returns after the timeout
            body = FIRST + await resp.read()
        assert error_event(body)["code"] == "shutting_down"
        await asyncio.wait_for(upstream.fake.cancelled.wait(), timeout=5)
        # A stream started now would be cut at once: refused instead.
        async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "shutting_down"
            assert resp.headers["Retry-After"] == "1"


async def test_sigterm_ends_a_demo_stream_with_shutting_down_and_exits_0(
    gateway_process: GatewayProcessFactory,
) -> None:
    proc = gateway_process({"SHUTDOWN_TIMEOUT_SECONDS": "1", "DEMO_TOKEN_DELAY_SECONDS": "0.5"})
    async with aiohttp.ClientSession(proc.url) as client:
        resp = await client.post(
            "/apps/demo/agent/chat", headers=CSRF, json={"message": "a long answer please"}
        )
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"event: token\n")
        proc.signal(signal.SIGTERM)
        signalled = time.monotonic()
        body = first + await resp.read()
        ended = time.monotonic() - signalled
        resp.release()
    events = sse_events(body.decode())
    assert events[-1][0] == "error" and json.loads(events[-1][1])["code"] == "shutting_down"
    assert "done" not in [e for e, _ in events]
    assert 0.5 < ended < 5, ended  # streams may finish for SHUTDOWN_TIMEOUT_SECONDS, not longer
    assert await asyncio.to_thread(proc.wait, 15) == 0
