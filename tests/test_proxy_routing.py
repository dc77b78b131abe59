"""Routing to the upstream: exact paths and queries, base-path escapes, methods, WebSocket
refusal, status pass-through, body cap, and the browser rules (Origin, CORS, CSRF)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import CSRF
from tests.fake_upstream import (
    RunningGateway,
    ServedUpstream,
    app_settings,
    raw_request,
    run_gateway,
    send_and_read_head,
    stall_and_time_close,
    start_sse,
)

AGENT = "/apps/shop/agent"
SHOP_ORIGIN = "https://shop.example.com"


@pytest.fixture
async def gw(upstream: ServedUpstream) -> AsyncIterator[RunningGateway]:
    settings = app_settings(
        upstream.base, allowed_origins=frozenset({SHOP_ORIGIN}), max_body_bytes=1000
    )
    async with run_gateway(settings) as gateway:
        yield gateway


def error_code(body: bytes) -> str:
    code: str = json.loads(body)["error"]["code"]
    return code


# -- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "upstream_target"),
    [
        ("threads/t-1/runs/stream", "/v1/threads/t-1/runs/stream"),
        ("runs?stream_mode=values&x=%2F%20&flag", "/v1/runs?stream_mode=values&x=%2F%20&flag"),
        ("a%20b/caf%C3%A9", "/v1/a%20b/caf%C3%A9"),
        ("items/~me:1;v=2,3", "/v1/items/~me:1;v=2,3"),
        ("100%25", "/v1/100%25"),
        ("dir/", "/v1/dir/"),
        ("", "/v1/"),
        ("?q=1", "/v1/?q=1"),
        ("..data/x..y/.well-known", "/v1/..data/x..y/.well-known"),
        ("a;v=1/..x;y/...;z", "/v1/a;v=1/..x;y/...;z"),
    ],
)
async def test_paths_and_queries_reach_the_upstream_exactly(
    upstream: ServedUpstream, gw: RunningGateway, tail: str, upstream_target: str
) -> None:
    resp = await raw_request(gw.url, f"{AGENT}/{tail}")
    assert resp.status == 200, resp.body
    assert upstream.fake.last.raw_path_qs == upstream_target


@pytest.mark.parametrize(
    "tail",
    [
        "../session",
        "..",
        "a/../../x",
        "./x",
        ".",
        "%2e%2e/x",
        "%2E%2E/x",
        ".%2e/x",
        "%2e/x",
        "%252e%252e/x",  # double-encoded: `..` to an upstream that decodes twice
        "%25252e%25252e/x",
        "%2525252e",  # four levels deep
        "a%2fb",
        "a%2F..%2F..%2Fadmin",
        "a%5cb",
        "a%255cb",
        "a\\b",
        "/evil.example/x",  # `agent//evil.example/x`
        "a//b",
        "@evil.example/x",
        "x@evil.example",
        "%40evil.example",
        "a%00b",
        "a%0d%0aX-Injected:%20yes",
        "a%7fb",
        "a%zz",
        # Path parameters on dot segments: `..` to Tomcat/Jetty/Spring upstreams.
        "..;/x",
        ".;/x",
        "..;jsessionid=1/x",
        "a/..;/..;/admin",
        "%2e%2e;/x",
        ".%2e;x=1/y",
        "..%3b/x",
        "%252e%252e%253b/x",
        'a"b',
        "a<b>",
    ],
)
async def test_base_path_escapes_are_refused(
    upstream: ServedUpstream, gw: RunningGateway, tail: str
) -> None:
    resp = await raw_request(gw.url, f"{AGENT}/{tail}")
    assert resp.status == 400, (tail, resp.status, resp.body)
    assert error_code(resp.body) == "invalid_path"
    assert upstream.fake.seen == []


async def test_an_absolute_form_target_cannot_choose_the_host(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    resp = await raw_request(gw.url, f"http://evil.example{AGENT}/x?y=1")
    assert resp.status == 200
    assert upstream.fake.last.raw_path_qs == "/v1/x?y=1"
    assert upstream.fake.last.headers["Host"] == f"{upstream.base.host}:{upstream.base.port}"


async def test_an_upstream_without_a_base_path(upstream: ServedUpstream) -> None:
    async with run_gateway(app_settings(upstream.server.make_url("/"))) as gw:
        assert (await raw_request(gw.url, f"{AGENT}/x/y?z")).status == 200
        assert (await raw_request(gw.url, f"{AGENT}/../x")).status == 400
    assert [s.raw_path_qs for s in upstream.fake.seen] == ["/x/y?z"]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
async def test_every_method_is_forwarded(
    upstream: ServedUpstream, gw: RunningGateway, method: str
) -> None:
    async with gw.client.request(method, f"{AGENT}/things/1", headers=CSRF) as resp:
        assert resp.status == 200
        if method != "HEAD":
            assert (await resp.json())["method"] == method
    assert upstream.fake.last.method == method


async def test_websocket_upgrades_are_refused(upstream: ServedUpstream, gw: RunningGateway) -> None:
    resp = await raw_request(
        gw.url,
        f"{AGENT}/ws",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        },
    )
    assert resp.status == 501
    assert error_code(resp.body) == "websocket_not_supported"
    assert upstream.fake.seen == []
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await gw.client.ws_connect(f"{AGENT}/ws")
    assert err.value.status == 501


# -- statuses pass through ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        # Redirects within the application or to another host (docs/security.md: one to this
        # host outside /apps/shop/ is 502 upstream_redirect_not_allowed).
        (302, {"Location": "elsewhere"}, b""),
        (301, {"Location": "https://other.example/"}, b"moved"),
        (307, {"Location": "http://other.example:1/x"}, b""),
        (201, {"Location": "/v1/threads/9"}, b'{"thread_id": "9"}'),
        (400, {"Content-Type": "application/json"}, b'{"detail": "bad input"}'),
        (401, {"WWW-Authenticate": 'Bearer realm="agents"'}, b"no"),
        (404, {"Content-Type": "text/plain"}, b"not here"),
        (422, {"Content-Type": "application/problem+json"}, b'{"title": "invalid"}'),
        (429, {"Retry-After": "7"}, b"slow down"),
        (500, {"Content-Type": "text/html"}, b"<h1>boom</h1>"),
        (503, {"Retry-After": "3"}, b""),
    ],
)
async def test_upstream_statuses_headers_and_bodies_pass_through(
    upstream: ServedUpstream,
    gw: RunningGateway,
    status: int,
    headers: dict[str, str],
    body: bytes,
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, headers=headers, body=body)

    upstream.fake.on("/v1/r", answer)
    async with gw.client.post(f"{AGENT}/r", headers=CSRF, allow_redirects=False) as resp:
        assert resp.status == status
        for name, value in headers.items():
            assert resp.headers[name] == value
        assert await resp.read() == body
    assert len(upstream.fake.seen) == 1, "redirects must not be followed by the gateway"


async def test_no_content_and_not_modified_pass_through(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async def empty(request: web.Request) -> web.Response:
        status = 204 if request.method == "DELETE" else 304
        return web.Response(status=status, headers={"ETag": '"v1"'})

    upstream.fake.on("/v1/e", empty)
    async with gw.client.delete(f"{AGENT}/e", headers=CSRF) as resp:
        assert resp.status == 204
        assert await resp.read() == b""
    async with gw.client.get(f"{AGENT}/e", headers={"If-None-Match": '"v1"'}) as resp:
        assert resp.status == 304
        assert resp.headers["ETag"] == '"v1"'
    assert upstream.fake.last.headers["If-None-Match"] == '"v1"'


# -- body cap -------------------------------------------------------------------------------


async def test_a_declared_body_over_the_cap_is_refused_before_the_upstream(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async with gw.client.post(f"{AGENT}/chat", headers=CSRF, data=b"x" * 1001) as resp:
        assert resp.status == 413
        assert error_code(await resp.read()) == "body_too_large"
    assert upstream.fake.seen == []
    async with gw.client.post(f"{AGENT}/chat", headers=CSRF, data=b"x" * 1000) as resp:
        assert resp.status == 200
    assert upstream.fake.last.body == b"x" * 1000


async def test_a_chunked_body_is_cut_off_at_the_cap(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async def chunks(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"y" * 100

    async with gw.client.post(f"{AGENT}/chat", headers=CSRF, data=chunks(30)) as resp:
        assert resp.status == 413
        assert error_code(await resp.read()) == "body_too_large"
    async with gw.client.post(f"{AGENT}/chat", headers=CSRF, data=chunks(10)) as resp:
        assert resp.status == 200
        assert (await resp.json())["body_bytes"] == 1000


async def test_an_upload_slower_than_connect_timeout_is_not_an_upstream_timeout(
    upstream: ServedUpstream,
) -> None:
    """The 504 timer is the upstream's: it does not run while the browser is still sending."""
    settings = app_settings(
        upstream.base, {"BODY_TIMEOUT_SECONDS": "10"}, connect_timeout_seconds=0.15
    )

    async def slow_chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"y" * 100
            await asyncio.sleep(0.08)  # the upload takes ~0.4 s, over the 0.15 s connect timeout

    async with run_gateway(settings) as gateway:
        resp = await gateway.client.post(f"{AGENT}/chat", headers=CSRF, data=slow_chunks())
        assert resp.status == 200, await resp.read()
        assert (await resp.json())["body_bytes"] == 500


async def test_a_stalled_upload_is_408_body_timeout(upstream: ServedUpstream) -> None:
    settings = app_settings(
        upstream.base, {"BODY_TIMEOUT_SECONDS": "0.3"}, connect_timeout_seconds=0.2
    )
    async with run_gateway(settings) as gateway:
        url = gateway.url
        assert url.host is not None and url.port is not None
        head, body = await send_and_read_head(  # 10 s: generous, the body deadline is 0.3 s
            url.host,
            url.port,
            f"POST {AGENT}/chat HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n".encode()
            + b"X-CSRF: 1\r\nContent-Length: 100\r\n\r\n"
            + b"x" * 10,  # and nothing more
        )
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert error_code(body) == "body_timeout"


async def test_a_stalled_upload_gets_408_and_the_connection_closes_at_once(
    upstream: ServedUpstream,
) -> None:
    """The 408 says `Connection: close` and the gateway closes then: a stalled uploader does
    not hold the connection while aiohttp waits (10 s) for the rest of a body nobody reads."""
    settings = app_settings(
        upstream.base, {"BODY_TIMEOUT_SECONDS": "0.3"}, connect_timeout_seconds=0.2
    )
    async with run_gateway(settings) as gateway:
        url = gateway.url
        assert url.host is not None and url.port is not None
        raw, seconds_to_close = await stall_and_time_close(
            url.host,
            url.port,
            f"POST {AGENT}/chat HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n".encode()
            + b"X-CSRF: 1\r\nContent-Length: 100\r\n\r\n"
            + b"x" * 10,  # and nothing more
        )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert b"\r\nConnection: close" in head, head
    assert error_code(body) == "body_timeout"
    assert seconds_to_close < 1.0, seconds_to_close


async def test_a_refused_body_is_answered_then_the_connection_closes(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    """Any error answered before the body was read (here 403 without `X-CSRF`, 413 over the
    declared cap) closes the connection after the answer, whatever the rest of the body does."""
    url = gw.url
    assert url.host is not None and url.port is not None
    for extra, status in ((b"", b"403"), (b"X-CSRF: 1\r\n", b"413")):
        length = b"100" if status == b"403" else b"5000"
        raw, seconds_to_close = await stall_and_time_close(
            url.host,
            url.port,
            f"POST {AGENT}/chat HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n".encode()
            + extra
            + b"Content-Length: "
            + length
            + b"\r\n\r\n"
            + b"x" * 10,
        )
        assert raw.startswith(b"HTTP/1.1 " + status + b" "), raw
        assert b"\r\nConnection: close" in raw, raw
        assert seconds_to_close < 1.0, (status, seconds_to_close)


# -- Origin, CORS, CSRF on the agent route --------------------------------------------------


async def test_state_changing_agent_calls_need_the_csrf_header(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        async with gw.client.request(method, f"{AGENT}/chat") as resp:
            assert resp.status == 403
            assert error_code(await resp.read()) == "csrf_header_missing"
    async with gw.client.get(f"{AGENT}/chat") as resp:
        assert resp.status == 200
    assert [s.method for s in upstream.fake.seen] == ["GET"]


async def test_foreign_origins_are_refused_before_anything_runs(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    evil = {"Origin": "https://evil.example", **CSRF}
    for method in ("GET", "POST"):
        async with gw.client.request(method, f"{AGENT}/chat", headers=evil) as resp:
            assert resp.status == 403
            assert error_code(await resp.read()) == "origin_not_allowed"
            assert "Access-Control-Allow-Origin" not in resp.headers
            assert "Set-Cookie" not in resp.headers
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with gw.client.options(f"{AGENT}/chat", headers=preflight) as resp:
        assert resp.status == 403
    assert upstream.fake.seen == []


async def test_allowed_origins_get_credentialed_cors_on_streams(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async def chat(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request, **{"Access-Control-Allow-Origin": "*"})
        await response.write(b"data: hi\n\n")
        await response.write_eof()
        return response

    upstream.fake.on("/v1/chat", chat)
    preflight = {
        "Origin": SHOP_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-csrf, last-event-id",
    }
    async with gw.client.options(f"{AGENT}/chat", headers=preflight) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == SHOP_ORIGIN
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        allowed = {
            h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")
        }
        assert {"content-type", "x-csrf", "accept", "last-event-id"} <= allowed
    assert upstream.fake.seen == [], "preflights are answered by the gateway"

    headers = {"Origin": SHOP_ORIGIN, "Accept": "text/event-stream", **CSRF}
    async with gw.client.post(f"{AGENT}/chat", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers.getall("Access-Control-Allow-Origin") == [SHOP_ORIGIN]
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
        assert "Origin" in resp.headers.getall("Vary")
        assert await resp.read() == b"data: hi\n\n"


async def test_same_origin_and_originless_requests_are_allowed(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    own = {"Origin": str(gw.url), **CSRF}
    async with gw.client.post(f"{AGENT}/chat", headers=own) as resp:
        assert resp.status == 200
        assert "Access-Control-Allow-Origin" not in resp.headers
    async with gw.client.post(f"{AGENT}/chat", headers=CSRF) as resp:
        assert resp.status == 200
    assert len(upstream.fake.seen) == 2


async def test_unknown_and_malformed_applications(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    assert error_code((await raw_request(gw.url, "/apps/nope/agent/x")).body) == (
        "unknown_application"
    )
    assert error_code((await raw_request(gw.url, "/apps/Bad.Id/agent/x")).body) == (
        "invalid_application_id"
    )
    assert upstream.fake.seen == []
