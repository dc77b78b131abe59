"""Upstream capacity per application (issue 12 row 9, issue 16 "no 504 for a saturated
gateway"): an application at its cap, or a full pool, answers 503 `upstream_busy` at once, and
never takes another application's connections; slots never leak; uploads have a total deadline.

Real sockets throughout: the gateway served as `python -m app` serves it (`run_gateway`), a fake
upstream agent on its own port, browsers that hold streams and uploads open for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import re
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from yarl import URL

from app import capacity as capacity_module
from app.applications import (
    DEFAULT_PER_CLIENT,
    DEFAULT_PER_SESSION,
    AppConfig,
    parse_rate_limit,
)
from app.capacity import UpstreamBusy, UpstreamCapacity, client_key
from app.config import ConfigError, Settings
from app.keys import LIFECYCLE_KEY, UPSTREAM_KEY
from tests.conftest import CSRF, GatewayProcessFactory, make_settings
from tests.fake_upstream import (
    RunningGateway,
    ServedUpstream,
    run_gateway,
    send_and_read_head,
    sse,
    start_sse,
)

FIRST = sse("token", {"text": "first"})


def two_apps(
    base: URL,
    env: Mapping[str, str] | None = None,
    a: Mapping[str, Any] | None = None,
    b: Mapping[str, Any] | None = None,
) -> Settings:
    """Applications `a` and `b`, both on the fake upstream (under `/v1/a` and `/v1/b`)."""
    apps = {
        name: AppConfig(
            app_id=name,
            upstream=f"{base}/{name}",
            **{"connect_timeout_seconds": 0.5, **dict(fields or {})},
        )
        for name, fields in (("a", a), ("b", b))
    }
    return dataclasses.replace(make_settings(dict(env or {})), apps=apps)


def anonymous(gw: RunningGateway) -> aiohttp.ClientSession:
    """A browser without cookies: every request of it starts a new session."""
    return aiohttp.ClientSession(base_url=gw.url, cookie_jar=aiohttp.DummyCookieJar())


async def held_stream(request: web.Request) -> web.StreamResponse:
    """One event, then silence until the browser goes away (a slow agent)."""
    response = await start_sse(request)
    await response.write(FIRST)
    await asyncio.sleep(60)
    return response


async def quick_stream(request: web.Request) -> web.StreamResponse:
    response = await start_sse(request)
    await response.write(FIRST)
    await response.write_eof()
    return response


async def open_stream(
    client: aiohttp.ClientSession, path: str
) -> tuple[aiohttp.ClientResponse, float]:
    """POST `path` and wait for the first event: (the open response, seconds to that event)."""
    started = time.perf_counter()
    resp = await client.post(path, headers={**CSRF, "Accept": "text/event-stream"})
    assert resp.status == 200, await resp.read()
    assert await resp.content.readuntil(b"\n\n") == FIRST
    return resp, time.perf_counter() - started


async def busy_answer(client: aiohttp.ClientSession, path: str) -> tuple[float, dict[str, Any]]:
    """POST `path`, expecting 503 `upstream_busy`: (seconds it took, the error body)."""
    started = time.perf_counter()
    async with client.post(path, headers=CSRF) as resp:
        elapsed = time.perf_counter() - started
        body = await resp.read()
        assert resp.status == 503, (resp.status, body)
        assert resp.headers["Retry-After"].isdigit()
        assert resp.headers["Cache-Control"] == "no-store"
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["code"] == "upstream_busy", error
    return elapsed, error


async def scrape(gw: RunningGateway) -> str:
    async with gw.client.get("/metrics") as resp:
        return await resp.text()


def sample(metrics: str, name: str, labels: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{labels}}} not in the scrape")


@pytest.fixture
def slow_upstream(upstream: ServedUpstream) -> ServedUpstream:
    for name in ("a", "b"):
        upstream.fake.on(f"/v1/{name}/hold", held_stream)
        upstream.fake.on(f"/v1/{name}/chat", quick_stream)
    return upstream


# -- isolation ------------------------------------------------------------------------------


async def test_an_application_filling_the_pool_leaves_the_other_one_unaffected(
    slow_upstream: ServedUpstream,
) -> None:
    """The pool is 4; application `a` (default cap: half of it) is flooded with 8 concurrent
    anonymous slow streams. `a`'s overflow is 503 `upstream_busy` at once; `b` answers as fast
    as before, never 5xx, and may still use its whole share."""
    settings = two_apps(slow_upstream.base, {"UPSTREAM_POOL_SIZE": "4"})
    async with run_gateway(settings) as gw, anonymous(gw) as browser:
        baseline = [await first_event_time(browser, "/apps/b/agent/chat") for _ in range(10)]
        flood = await asyncio.gather(*(attempt(browser, "/apps/a/agent/hold") for _ in range(8)))
        try:
            statuses = sorted(status for status, _, _ in flood)
            loaded = [await first_event_time(browser, "/apps/b/agent/chat") for _ in range(10)]
            b_held = [await open_stream(browser, "/apps/b/agent/hold") for _ in range(2)]
            metrics = await scrape(gw)
        finally:
            for _, _, resp in flood:
                if resp is not None:
                    resp.close()
        for resp, _ in b_held:
            resp.close()
    assert statuses == [200] * 2 + [503] * 6, flood
    refused = [(elapsed, body) for status, (elapsed, body), _ in flood if status == 503]
    assert all(json.loads(body)["error"]["code"] == "upstream_busy" for _, body in refused)
    assert max(elapsed for elapsed, _ in refused) < 0.1, refused
    # "Unchanged within noise": the median first-event time of `b` during `a`'s flood stays
    # below twice (or within 20 ms of) the median before it.
    before, during = statistics.median(baseline), statistics.median(loaded)
    assert during < max(2 * before, before + 0.02), (baseline, loaded)
    assert sample(metrics, "agent_bff_upstream_slots_in_use", 'application="a"') == 2
    assert sample(metrics, "agent_bff_upstream_slots_in_use", 'application="b"') == 2
    assert sample(metrics, "agent_bff_upstream_slots_limit", 'application="a"') == 2
    busy = 'application="a",limit="application"'
    assert sample(metrics, "agent_bff_upstream_busy_total", busy) == 6


async def attempt(
    client: aiohttp.ClientSession, path: str
) -> tuple[int, tuple[float, bytes], aiohttp.ClientResponse | None]:
    """POST `path`: (status, (seconds to the answer head, error body), the open 200 stream)."""
    started = time.perf_counter()
    resp = await client.post(path, headers={**CSRF, "Accept": "text/event-stream"})
    elapsed = time.perf_counter() - started
    if resp.status == 200:
        return 200, (elapsed, b""), resp
    async with resp:
        return resp.status, (elapsed, await resp.read()), None


async def first_event_time(client: aiohttp.ClientSession, path: str) -> float:
    resp, elapsed = await open_stream(client, path)
    async with resp:
        await resp.read()
    return elapsed


async def test_slow_uploads_holding_an_application_at_its_cap_leave_the_other_one_unaffected(
    slow_upstream: ServedUpstream,
) -> None:
    """Uploads dripping a byte at a time hold `a`'s two slots; `b` is served, `a`'s third
    upload is refused at once (before its body is read)."""

    async def read_all(request: web.Request) -> web.Response:
        return web.json_response({"bytes": len(await request.read())})

    slow_upstream.fake.on("/v1/a/upload", read_all)
    settings = two_apps(
        slow_upstream.base, {"UPSTREAM_POOL_SIZE": "4", "BODY_TIMEOUT_SECONDS": "5"}
    )
    async with run_gateway(settings) as gw, anonymous(gw) as browser:
        assert gw.url.host is not None and gw.url.port is not None
        drips = [await dripping_upload(gw.url.host, gw.url.port, "/apps/a/agent/upload")]
        drips.append(await dripping_upload(gw.url.host, gw.url.port, "/apps/a/agent/upload"))
        try:
            await wait_for(lambda: gw.app[UPSTREAM_KEY].capacity.apps["a"].in_use == 2)
            elapsed, error = await busy_answer(browser, "/apps/a/agent/upload")
            assert elapsed < 0.1, elapsed
            assert "application" in error["message"]
            for _ in range(3):
                async with browser.post("/apps/b/agent/chat", headers=CSRF) as resp:
                    assert resp.status == 200
        finally:
            for writer in drips:
                writer.close()
        await wait_for(lambda: gw.app[UPSTREAM_KEY].capacity.in_use == 0)


async def dripping_upload(host: str, port: int, path: str) -> asyncio.StreamWriter:
    """A POST whose 1000-byte body has sent its first byte and will never send another."""
    _, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nX-CSRF: 1\r\n".encode()
        + b"Content-Length: 100000\r\n\r\nx"
    )
    await writer.drain()
    return writer


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_full_pool_is_a_503_at_once_not_a_504_blaming_the_upstream(
    slow_upstream: ServedUpstream,
) -> None:
    """Issue 16: with the pool full, the next stream waited for a connection until the connect
    timeout and got 504 `upstream_timeout`. Now: 503 `upstream_busy` at once."""
    settings = two_apps(slow_upstream.base, {"UPSTREAM_POOL_SIZE": "3"}, a={}, b={})
    settings = dataclasses.replace(settings, apps={"a": settings.apps["a"]})
    async with run_gateway(settings) as gw, anonymous(gw) as browser:
        held = [await open_stream(browser, "/apps/a/agent/hold") for _ in range(3)]
        try:
            for _ in range(5):
                elapsed, _ = await busy_answer(browser, "/apps/a/agent/hold")
                assert elapsed < 0.1, elapsed
        finally:
            for resp, _ in held:
                resp.close()
        # Once the streams ended, the capacity is back: the pool never kept a connection.
        await wait_for(lambda: gw.app[UPSTREAM_KEY].capacity.in_use == 0)
        held = [await open_stream(browser, "/apps/a/agent/hold") for _ in range(3)]
        for resp, _ in held:
            resp.close()


# -- per session and per client address -----------------------------------------------------


async def test_one_session_may_hold_only_its_own_cap(slow_upstream: ServedUpstream) -> None:
    settings = two_apps(slow_upstream.base, a={"max_concurrent_per_session": 2})
    async with run_gateway(settings) as gw:
        held = [await open_stream(gw.client, "/apps/a/agent/hold") for _ in range(2)]
        try:
            elapsed, error = await busy_answer(gw.client, "/apps/a/agent/hold")
            assert elapsed < 0.1
            assert "session" in error["message"]
            # Another browser (another session) from the same address is served.
            async with anonymous(gw) as other:
                resp, _ = await open_stream(other, "/apps/a/agent/hold")
                resp.close()
            # The refused request kept the session (its cookie is the same one).
            assert len(gw.client.cookie_jar) == 1
        finally:
            for resp, _ in held:
                resp.close()
        await wait_for(lambda: not gw.app[UPSTREAM_KEY].capacity.apps["a"].sessions)
        resp, _ = await open_stream(gw.client, "/apps/a/agent/hold")
        resp.close()


async def test_anonymous_streams_from_one_address_are_capped_per_client(
    slow_upstream: ServedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Cookieless requests make a new session each: the per-client cap is what stops one
    client. Behind a trusted proxy the address is the forwarded one."""
    settings = two_apps(
        slow_upstream.base,
        {"TRUSTED_PROXIES": "127.0.0.1/32"},
        a={"max_concurrent_per_client": 2},
    )
    async with run_gateway(settings) as gw, anonymous(gw) as browser:

        async def stream_from(address: str) -> aiohttp.ClientResponse:
            resp = await browser.post(
                "/apps/a/agent/hold", headers={**CSRF, "X-Forwarded-For": address}
            )
            return resp

        held = [await stream_from("203.0.113.7") for _ in range(2)]
        held += [await stream_from("2001:db8:1:2::1"), await stream_from("2001:db8:1:2::2")]
        try:
            assert [r.status for r in held] == [200] * 4
            for address in ("203.0.113.7", "2001:db8:1:2:ffff::9"):  # the same /64
                async with await stream_from(address) as resp:
                    assert resp.status == 503
                    error = (await resp.json())["error"]
                assert error["code"] == "upstream_busy"
                assert "address" in error["message"]
            other = await stream_from("203.0.113.8")
            held.append(other)
            assert other.status == 200
            other_v6 = await stream_from("2001:db8:1:3::1")
            held.append(other_v6)
            assert other_v6.status == 200
            clients = dict(gw.app[UPSTREAM_KEY].capacity.apps["a"].clients)
        finally:
            for resp in held:
                resp.close()
    assert not [r for r in caplog.records if "TRUSTED_PROXIES" in r.getMessage()]
    assert clients == {
        "203.0.113.7": 2,
        "2001:db8:1:2::/64": 2,
        "203.0.113.8": 1,
        "2001:db8:1:3::/64": 1,
    }


def test_client_keys_group_ipv6_by_64_and_unmap_ipv4() -> None:
    cases = {
        "192.0.2.1": "192.0.2.1",
        "2001:db8::1": "2001:db8::/64",
        "2001:db8:0:0:ffff:ffff:ffff:ffff": "2001:db8::/64",
        "::ffff:192.0.2.1": "192.0.2.1",
        "fe80::1%eth0": "fe80::/64",
    }
    for peer, key in cases.items():
        transport = mock.Mock()
        transport.get_extra_info.return_value = (peer, 1234)
        request = make_mocked_request("GET", "/", transport=transport)
        assert client_key(request, ()) == key, peer


# -- uploads: a total deadline --------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "env", "app_fields", "deadline"),
    [
        (100, {"UPLOAD_TIMEOUT_SECONDS": "0.6"}, {}, 0.6),  # read whole before sending
        (100_000, {"UPLOAD_TIMEOUT_SECONDS": "0.6"}, {}, 0.6),  # streamed upstream
        (100_000, {"UPLOAD_TIMEOUT_SECONDS": "30"}, {"upload_timeout_seconds": 0.5}, 0.5),
    ],
)
async def test_an_upload_dripping_just_under_the_pause_limit_ends_at_its_total_deadline(
    upstream: ServedUpstream,
    length: int,
    env: dict[str, str],
    app_fields: dict[str, Any],
    deadline: float,
) -> None:
    """One byte every 0.1 s never trips `BODY_TIMEOUT_SECONDS` (0.25); the whole body is due
    within `UPLOAD_TIMEOUT_SECONDS` (or the application's `upload_timeout_seconds`): 408."""

    async def read_all(request: web.Request) -> web.Response:
        return web.json_response({"bytes": len(await request.read())})

    upstream.fake.on("/v1/a/upload", read_all)
    settings = two_apps(upstream.base, {"BODY_TIMEOUT_SECONDS": "0.25", **env}, a=app_fields)
    async with run_gateway(settings) as gw:
        assert gw.url.host is not None and gw.url.port is not None
        reader, writer = await asyncio.open_connection(gw.url.host, gw.url.port)
        started = time.monotonic()
        writer.write(
            f"POST /apps/a/agent/upload HTTP/1.1\r\nHost: {gw.url.host}\r\nX-CSRF: 1\r\n".encode()
            + f"Content-Length: {length}\r\n\r\n".encode()
        )

        async def drip() -> None:
            for _ in range(length):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.1)

        dripping = asyncio.create_task(drip())
        try:
            async with asyncio.timeout(deadline + 3):
                head = await reader.readuntil(b"\r\n\r\n")
            elapsed = time.monotonic() - started
            length_header = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            assert length_header is not None, head
            body = await reader.readexactly(int(length_header.group(1)))
        finally:
            dripping.cancel()
            writer.transport.abort()
        await wait_for(lambda: gw.app[UPSTREAM_KEY].capacity.in_use == 0)
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert json.loads(body)["error"]["code"] == "body_timeout"
    assert deadline - 0.05 <= elapsed < deadline + 1.0, elapsed  # not at a later pause


# -- slots never leak -----------------------------------------------------------------------


async def test_slots_are_returned_however_200_requests_end(upstream: ServedUpstream) -> None:
    """208 requests (in waves of 26 concurrent ones) ending in every way (served, refused,
    408, 413, 429, 502, 504, upstream reset, idle timeout, browser gone before and after the
    answer started or mid-upload, session rotation, shutdown): afterwards nothing is held, and
    each application can fill its cap."""
    fake = upstream.fake

    async def slow_headers(request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.Response()

    async def reset(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(FIRST)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def rotate(request: web.Request) -> web.Response:
        return web.json_response({}, headers={"X-Session-Rotate": "1"})

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"bytes": len(await request.read())})

    for name in ("a", "b"):
        fake.on(f"/v1/{name}/hold", held_stream)
        fake.on(f"/v1/{name}/chat", quick_stream)
        fake.on(f"/v1/{name}/slow", slow_headers)
        fake.on(f"/v1/{name}/reset", reset)
        fake.on(f"/v1/{name}/rotate", rotate)
        fake.on(f"/v1/{name}/echo", echo)
    fields = {
        "max_concurrent_requests": 4,
        "max_concurrent_per_session": 2,
        "max_concurrent_per_client": 0,
        "idle_timeout_seconds": 0.2,
        "max_body_bytes": 1000,
        "connect_timeout_seconds": 0.2,
    }
    settings = two_apps(
        upstream.base,
        {"UPSTREAM_POOL_SIZE": "16", "BODY_TIMEOUT_SECONDS": "0.2"},
        a={**fields, "max_concurrent_requests": 8},
        b={
            **fields,
            "max_concurrent_requests": 6,
            "max_concurrent_per_client": 3,
            "rate_limit_per_session": parse_rate_limit("4/minute"),
        },
    )
    dead = AppConfig(app_id="dead", upstream="http://127.0.0.1:9/v1", max_concurrent_requests=2)
    settings = dataclasses.replace(settings, apps={**settings.apps, "dead": dead})
    outcomes: dict[str, int] = {}

    async with run_gateway(settings) as gw:
        assert gw.url.host is not None and gw.url.port is not None
        host, port = gw.url.host, gw.url.port
        capacity = gw.app[UPSTREAM_KEY].capacity
        jars = [aiohttp.CookieJar(unsafe=True) for _ in range(4)]
        browsers = [aiohttp.ClientSession(base_url=gw.url, cookie_jar=jar) for jar in jars]
        browsers.append(anonymous(gw))

        async def one(i: int) -> str:
            browser = browsers[i % len(browsers)]
            app = "ab"[(i // 13) % 2]  # every kind on both applications
            kind = i % 13
            path = f"/apps/{app}/agent/"
            timeout = aiohttp.ClientTimeout(total=3)
            if kind == 0:
                async with browser.post(path + "chat", headers=CSRF, timeout=timeout) as r:
                    await r.read()
                    return str(r.status)
            if kind == 1:  # browser gone mid-stream
                async with browser.post(path + "hold", headers=CSRF, timeout=timeout) as r:
                    if r.status == 200:
                        await r.content.readuntil(b"\n\n")
                    return f"{r.status} then gone"
            if kind == 2:  # browser gone before the upstream answered
                with contextlib.suppress(TimeoutError):
                    short = aiohttp.ClientTimeout(total=0.1)
                    async with browser.post(path + "slow", headers=CSRF, timeout=short) as r:
                        return str(r.status)
                return "gone before the answer"
            if kind == 3:
                async with browser.post(path + "slow", headers=CSRF, timeout=timeout) as r:
                    return str(r.status)  # 504 (connect timeout 0.2 s)
            if kind == 4:
                async with browser.post(path + "reset", headers=CSRF, timeout=timeout) as r:
                    with contextlib.suppress(aiohttp.ClientPayloadError):
                        await r.read()
                    return f"{r.status} reset"
            if kind == 5:  # idle timeout after the first event
                async with browser.post(path + "hold", headers=CSRF, timeout=timeout) as r:
                    await r.read()
                    return f"{r.status} idle"
            if kind == 6:
                async with browser.post(path + "rotate", headers=CSRF, timeout=timeout) as r:
                    return f"{r.status} rotate"
            if kind == 7:  # chunked body over max_body_bytes: 413 after the slot was taken

                async def big() -> AsyncIterator[bytes]:
                    for _ in range(3):
                        yield b"x" * 600

                async with browser.post(path + "echo", headers=CSRF, data=big()) as r:
                    return str(r.status)
            if kind == 8:  # a stalled upload: 408
                head, _ = await send_and_read_head(
                    host,
                    port,
                    f"POST {path}echo HTTP/1.1\r\nHost: {host}\r\nX-CSRF: 1\r\n".encode()
                    + b"Content-Length: 500\r\n\r\nxx",
                )
                return head.split(b" ")[1].decode()
            if kind == 9:
                async with browser.post("/apps/dead/agent/x", headers=CSRF, timeout=timeout) as r:
                    return f"{r.status} dead"
            if kind == 10:  # hang up in the middle of the request body
                _, writer = await asyncio.open_connection(host, port)
                writer.write(
                    f"POST {path}echo HTTP/1.1\r\nHost: {host}\r\nX-CSRF: 1\r\n".encode()
                    + b"Content-Length: 800\r\n\r\n"
                    + b"x" * 100
                )
                await writer.drain()
                await asyncio.sleep(0.1)
                writer.transport.abort()
                return "gone mid-upload"
            if kind == 11:
                async with browser.post(path + "echo", headers=CSRF, data=b"y" * 10) as r:
                    return str(r.status)
            async with browser.get(path + "../x", timeout=timeout) as r:
                return str(r.status)

        try:
            results: list[str | BaseException] = []
            for wave in range(8):  # 8 waves of 26 concurrent requests, two of each kind
                results += await asyncio.gather(
                    *(one(i) for i in range(wave * 26, wave * 26 + 26)), return_exceptions=True
                )
            for result in results:
                key = result if isinstance(result, str) else type(result).__name__
                outcomes[key] = outcomes.get(key, 0) + 1
            # A session at its cap of 2 (the waves rarely get there: the applications' caps
            # are usually full first).
            pair = [await open_stream(browsers[0], "/apps/a/agent/hold") for _ in range(2)]
            assert "session" in (await busy_answer(browsers[0], "/apps/a/agent/hold"))[1]["message"]
            for resp, _ in pair:
                resp.close()
            await wait_for(lambda: capacity.in_use == 0)
            # Shutdown with streams open: the streams end with `shutting_down`, slots return.
            held = [await open_stream(browsers[-1], "/apps/a/agent/hold") for _ in range(3)]
            assert capacity.in_use == 3
            gw.app[LIFECYCLE_KEY].stop_streams.set()
            for resp, _ in held:
                assert b"shutting_down" in await resp.read()
            await wait_for(lambda: capacity.in_use == 0)
            gw.app[LIFECYCLE_KEY].stop_streams.clear()
            await wait_for(lambda: capacity.in_use == 0)
            metrics = await scrape(gw)
            assert all(slots.in_use == 0 for slots in capacity.apps.values()), outcomes
            assert all(not slots.sessions and not slots.clients for slots in capacity.apps.values())
            # The connector agrees: no connection is still checked out (aiohttp's own count,
            # the one that would make a request wait).
            connector = gw.app[UPSTREAM_KEY].session.connector
            assert connector is not None
            assert len(connector._acquired) == 0  # aiohttp's private count: test only
            refusals = {
                (app, limit): sample(
                    metrics,
                    "agent_bff_upstream_busy_total",
                    f'application="{app}",limit="{limit}"',
                )
                for app in ("a", "b")
                for limit in ("application", "client", "session")
            }
            # Each limit refused some (`b`'s client cap of 3 comes before its cap of 6).
            assert refusals[("a", "application")] and refusals[("b", "client")], refusals
            assert refusals[("a", "session")], refusals
            for app in ("a", "b", "dead"):
                assert (
                    sample(metrics, "agent_bff_upstream_slots_in_use", f'application="{app}"') == 0
                )
            # Every application can still fill its caps: no connection was kept from the pool.
            fill = anonymous(gw)
            browsers.append(fill)
            streams = [await open_stream(fill, "/apps/a/agent/hold") for _ in range(8)]
            assert "application" in (await busy_answer(fill, "/apps/a/agent/hold"))[1]["message"]
            streams += [await open_stream(fill, "/apps/b/agent/hold") for _ in range(3)]
            assert "address" in (await busy_answer(fill, "/apps/b/agent/hold"))[1]["message"]
            for resp, _ in streams:
                resp.close()
        finally:
            for browser in browsers:
                await browser.close()
    # Every way of ending happened at least once.
    seen = " ".join(outcomes)
    for expected in ("200", "503", "408", "413", "429", "504", "dead", "reset", "idle", "gone"):
        assert expected in seen, outcomes
    assert not [r for r in results if isinstance(r, BaseException)], outcomes  # no surprises


# -- configuration --------------------------------------------------------------------------


def settings_with_apps(tmp_path: Path, apps_toml: str, **env: str) -> Settings:
    apps_file = tmp_path / "apps.toml"
    apps_file.write_text(apps_toml)
    return make_settings({"APPS_FILE": str(apps_file), **env})


def test_caps_default_to_an_equal_share_of_the_pool(tmp_path: Path) -> None:
    settings = settings_with_apps(
        tmp_path,
        '[apps.a]\nupstream = "http://a.internal"\nmax_concurrent_requests = 100\n'
        '[apps.b]\nupstream = "http://b.internal"\n[apps.c]\nupstream = "http://c.internal"\n',
        UPSTREAM_POOL_SIZE="301",
    )
    capacity = UpstreamCapacity(settings.apps, settings.upstream_pool_size)
    assert {app_id: s.limit for app_id, s in capacity.apps.items()} == {
        "a": 100,
        "b": 100,
        "c": 100,
    }
    b = capacity.apps["b"]
    assert (b.per_session, b.per_client) == (DEFAULT_PER_SESSION, DEFAULT_PER_CLIENT)
    assert settings.upload_timeout_seconds == 300.0
    assert settings.apps["a"].upload_timeout_seconds is None


@pytest.mark.parametrize(
    ("apps_toml", "pool", "expected"),
    [
        (
            "max_concurrent_requests = 600\n[apps.b]\nupstream = 'http://b'\n"
            "max_concurrent_requests = 500\n",
            "1000",
            "UPSTREAM_POOL_SIZE=1000 is smaller than the applications' max_concurrent_requests "
            "in APPS_FILE (together 1100): raise UPSTREAM_POOL_SIZE to at least 1100 or lower "
            "the caps",
        ),
        (
            "max_concurrent_requests = 4\n[apps.b]\nupstream = 'http://b'\n",
            "4",
            "(together 4 plus one for each of the 1 without one): raise UPSTREAM_POOL_SIZE to "
            "at least 5",
        ),
        ("max_concurrent_requests = 0\n", "10", "'max_concurrent_requests' must be a positive"),
        ("max_concurrent_requests = true\n", "10", "'max_concurrent_requests' must be a positive"),
        ("max_concurrent_per_session = -1\n", "10", "'max_concurrent_per_session' must be 0"),
        ("max_concurrent_per_client = 1.5\n", "10", "'max_concurrent_per_client' must be 0"),
        ("upload_timeout_seconds = 0\n", "10", "'upload_timeout_seconds' must be a positive"),
    ],
)
def test_caps_that_cannot_keep_applications_apart_are_refused_at_start(
    tmp_path: Path, apps_toml: str, pool: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_with_apps(
            tmp_path, f"[apps.a]\nupstream = 'http://a'\n{apps_toml}", UPSTREAM_POOL_SIZE=pool
        )
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems


def test_upload_timeout_setting_is_validated() -> None:
    with pytest.raises(ConfigError) as caught:
        make_settings({"UPLOAD_TIMEOUT_SECONDS": "-1"})
    assert caught.value.problems == [
        "UPLOAD_TIMEOUT_SECONDS='-1' is not valid: use a positive number of seconds"
    ]
    assert make_settings({"UPLOAD_TIMEOUT_SECONDS": "45"}).upload_timeout_seconds == 45.0


def test_the_pool_guard_refuses_at_once_and_takes_nothing() -> None:
    """The process-wide guard (the caps already fit the pool; this holds should they not)."""
    apps = {"a": AppConfig(app_id="a", upstream="http://a", max_concurrent_per_client=1)}
    capacity = UpstreamCapacity(apps, 2)
    slots = capacity.apps["a"]
    capacity.enter(slots, "192.0.2.1")
    with pytest.raises(UpstreamBusy) as caught:
        capacity.enter(slots, "192.0.2.1")
    assert caught.value.limit == "client"
    capacity.in_use = 2  # as if something else held the pool
    with pytest.raises(UpstreamBusy) as caught:
        capacity.enter(slots, "192.0.2.2")
    assert (caught.value.status, caught.value.code, caught.value.limit) == (
        503,
        "upstream_busy",
        "pool",
    )
    assert slots.clients == {"192.0.2.1": 1} and slots.in_use == 1
    capacity.in_use = 1
    capacity.enter_session(slots, "s1")
    capacity.leave(slots, "192.0.2.1", "s1")
    assert (capacity.in_use, slots.in_use, slots.clients, slots.sessions) == (0, 0, {}, {})
    assert slots.refused == {"application": 0, "client": 1, "session": 0, "pool": 1}


# -- a browser that never reads -------------------------------------------------------------


async def firehose(request: web.Request) -> web.StreamResponse:
    """An event stream with as much to say as anyone will read."""
    response = await start_sse(request)
    event = b"data: " + b"x" * 65_536 + b"\n\n"
    while True:
        await response.write(event)


async def stalled_reader(host: str, port: int, path: str) -> socket.socket:
    """A POST whose client then reads nothing at all (a tiny receive window, never drained)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, port))
    await loop.sock_sendall(
        sock,
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nX-CSRF: 1\r\nContent-Length: 0\r\n\r\n".encode(),
    )
    return sock


async def test_a_browser_that_reads_nothing_gives_its_slot_back_after_the_idle_timeout(
    upstream: ServedUpstream,
) -> None:
    """Before: a client that never read held its slot (and upstream connection) for as long as
    the upstream had bytes for it. Now it is disconnected once it has accepted nothing for
    `idle_timeout_seconds`; a slow reader that keeps accepting bytes is not."""
    upstream.fake.on("/v1/a/firehose", firehose)
    settings = two_apps(upstream.base, a={"idle_timeout_seconds": 0.25})
    async with run_gateway(settings) as gw:
        assert gw.url.host is not None and gw.url.port is not None
        capacity = gw.app[UPSTREAM_KEY].capacity
        loop = asyncio.get_running_loop()
        slow = await stalled_reader(gw.url.host, gw.url.port, "/apps/a/agent/firehose")
        stalled = await stalled_reader(gw.url.host, gw.url.port, "/apps/a/agent/firehose")
        received = 0

        def read_slowly() -> None:
            nonlocal received
            with contextlib.suppress(BlockingIOError):
                received += len(slow.recv(8192))

        try:
            await wait_for(lambda: capacity.apps["a"].in_use == 2)
            started = time.monotonic()
            # The slow client reads 8 KiB every 0.1 s, the stalled one nothing.
            while capacity.apps["a"].in_use == 2 and time.monotonic() - started < 5:
                await asyncio.sleep(0.1)
                read_slowly()
            stalled_for = time.monotonic() - started
            assert capacity.apps["a"].in_use == 1
            for _ in range(10):  # the slow reader is still served 1 s (4 idle timeouts) later
                await asyncio.sleep(0.1)
                read_slowly()
            assert capacity.apps["a"].in_use == 1
            assert received > 50_000  # 8 KiB a poll
            # The stalled client's connection was aborted: what it can still read ends in
            # a reset, never in more of the stream.
            with pytest.raises(ConnectionError):
                async with asyncio.timeout(5):
                    while await loop.sock_recv(stalled, 1 << 20):
                        pass
                    raise ConnectionResetError("closed")
        finally:
            slow.close()
            stalled.close()
        await wait_for(lambda: capacity.in_use == 0)
    # Stalled from about when the stream started: gone within the idle timeout plus a few polls.
    assert stalled_for < 0.25 + 1.5, stalled_for


async def test_a_real_process_disconnects_a_browser_that_reads_nothing(
    upstream: ServedUpstream, gateway_process: GatewayProcessFactory, tmp_path: Path
) -> None:
    """The same on `python -m app` (uvloop's transports): the slot is back, and it says why."""
    upstream.fake.on("/v1/a/firehose", firehose)
    apps = tmp_path / "apps.toml"
    apps.write_text(f'[apps.a]\nupstream = "{upstream.base}/a"\nidle_timeout_seconds = 0.5\n')
    proc = gateway_process({"APPS_FILE": str(apps)})
    stalled = await stalled_reader("127.0.0.1", proc.port, "/apps/a/agent/firehose")
    try:
        async with aiohttp.ClientSession() as http:

            async def in_use() -> float:
                async with http.get(proc.url + "/metrics") as resp:
                    metrics = await resp.text()
                return sample(metrics, "agent_bff_upstream_slots_in_use", 'application="a"')

            async with asyncio.timeout(5):
                while await in_use() != 1:
                    await asyncio.sleep(0.05)
            started = time.monotonic()
            async with asyncio.timeout(5):
                while await in_use() != 0:
                    await asyncio.sleep(0.05)
            assert time.monotonic() - started < 0.5 + 1.5
    finally:
        stalled.close()
    assert "browser read nothing for 0.5s; connection closed (app a" in proc.stderr


async def test_a_proxy_missing_from_trusted_proxies_is_named_when_its_clients_share_a_cap(
    slow_upstream: ServedUpstream, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a balancer that is not in `TRUSTED_PROXIES` every client has its address: the
    refusal says so (once a minute), so the operator finds the missing setting."""
    monkeypatch.setattr(capacity_module, "_last_proxy_hint", -math.inf)
    settings = two_apps(slow_upstream.base, a={"max_concurrent_per_client": 1})
    forwarded = {**CSRF, "X-Forwarded-For": "203.0.113.9"}
    async with run_gateway(settings) as gw, anonymous(gw) as browser:
        held = await browser.post("/apps/a/agent/hold", headers=forwarded)
        try:
            assert held.status == 200
            for _ in range(2):
                async with browser.post("/apps/a/agent/hold", headers=forwarded) as resp:
                    assert resp.status == 503
        finally:
            held.close()
    hints = [r.getMessage() for r in caplog.records if "TRUSTED_PROXIES" in r.getMessage()]
    assert len(hints) == 1, hints
    assert hints[0].startswith("per-client cap reached by 127.0.0.1, a peer that forwards")
