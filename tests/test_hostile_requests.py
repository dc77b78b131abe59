"""Catalogue rows B* (docs/reliability.md): hostile or broken browsers, in process.

The gateway is served on a real socket (`run_gateway`, as `python -m app` serves it) with a real
`redis-server` behind it, so raw bytes no well-behaved client would send can be tried, and
`INFO commandstats` proves that refused input never reached the store. Each test also checks
that what was there before is intact (session value, cookie) and that input bytes are never
echoed back. Parser-level rows (B9 huge heads, B12 slowloris, B14 smuggling) run against real
processes with both HTTP parsers in `tests/test_http_parsers.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpServer

from app.apps_file import load_apps_file
from tests.conftest import CSRF
from tests.fake_upstream import (
    FakeUpstream,
    RawResponse,
    RunningGateway,
    ServedUpstream,
    app_settings,
    parse_raw_response,
    run_gateway,
)
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis_server

SESSION = "/apps/shop/session"
AGENT = "/apps/shop/agent"
SID_A = "A" * 43
SESSION_COMMANDS = ("get", "getex", "set", "del", "unlink", "evalsha", "eval", "pttl", "expire")
MARK = "Zq9Mark"  # planted in hostile input; must never come back in a response


async def send_raw(port: int, data: bytes, timeout: float = 5.0) -> RawResponse:
    """Write `data` as is, read the answer until the gateway closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    return parse_raw_response(raw)


def request_bytes(method: str, target: str, *headers: bytes, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1"), b"Host: 127.0.0.1", *headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def session_commands(server: RedisServer) -> dict[str, int]:
    calls = server.command_calls()
    return {c: calls[c] for c in SESSION_COMMANDS if calls.get(c)}


def reset_stats(server: RedisServer) -> None:
    with contextlib.closing(server.client()) as client:
        client.config_resetstat()


def stored_keys(server: RedisServer) -> list[bytes]:
    with contextlib.closing(server.client()) as client:
        keys = [k if isinstance(k, bytes) else k.encode() for k in client.keys("agent:sess:*")]
    return sorted(keys)


@pytest.fixture
async def gw(upstream: ServedUpstream, shared_redis: RedisServer) -> AsyncIterator[RunningGateway]:
    env = {"SESSION_STORE": "redis", "REDIS_URL": shared_redis.url}
    async with run_gateway(app_settings(upstream.base, env)) as gateway:
        yield gateway


async def new_session(gw: RunningGateway, data: dict[str, object]) -> str:
    """A fresh browser session holding `data`; returns its id (the jar is left empty)."""
    gw.client.cookie_jar.clear()
    async with gw.client.patch(SESSION, json=data, headers=CSRF) as resp:
        assert resp.status == 200
    (morsel,) = list(gw.client.cookie_jar)
    gw.client.cookie_jar.clear()
    return morsel.value


async def data_of(gw: RunningGateway, sid: str) -> object:
    async with gw.client.get(SESSION, headers={"Cookie": f"agent_sid={sid}"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    return body["data"]


# -- B2, B5: malformed, non-ASCII, oversized cookies ----------------------------------------

MALFORMED_COOKIES: dict[str, bytes] = {
    "non-ascii-utf8": ("agent_sid=" + "é" * 38 + MARK).encode(),
    "obs-text-bytes": b"agent_sid=" + b"\xff" * 36 + MARK.encode(),
    "quoted": b'agent_sid="' + b"A" * 34 + MARK.encode() + b'"',
    "percent-nul": b"agent_sid=%00" + b"A" * 33 + MARK.encode(),
    "comma-inside": b"agent_sid=" + b"A" * 20 + b"," + b"A" * 15 + MARK.encode(),
    "space-inside": b"agent_sid=" + b"A" * 20 + b" " + b"A" * 15 + MARK.encode(),
    "8kb-oversized": b"agent_sid=" + b"A" * 8000 + MARK.encode(),
    "42-chars": b"agent_sid=" + b"A" * 35 + MARK.encode(),
    "no-equals": b"agent_sid",
    "junk-around": b"=; ;;x=\xfe\xff; agent_sid=" + MARK.encode() + b"; y",
    "nul-byte": b"agent_sid=" + b"A" * 20 + b"\x00" + MARK.encode(),
    "control-byte": b"agent_sid=" + b"A" * 20 + b"\x01" + MARK.encode(),
}


@pytest.mark.parametrize("case", MALFORMED_COOKIES)
async def test_B02_B05_malformed_cookies_are_no_session_and_never_reach_the_store(
    gw: RunningGateway, shared_redis: RedisServer, case: str
) -> None:
    reset_stats(shared_redis)
    cookie = b"Cookie: " + MALFORMED_COOKIES[case]
    for method in ("GET", "DELETE"):
        resp = await send_raw(gw.port, request_bytes(method, SESSION, cookie, b"X-CSRF: 1"))
        assert resp.status in (200, 204, 400), resp
        if resp.status == 400:
            # aiohttp's parser refused NUL/control bytes itself: its plain-text 400 quotes the
            # sender's own line back (escaped; see B18 in docs/reliability.md), never as HTML.
            assert resp.headers["Content-Type"].startswith("text/plain")
            continue
        if resp.status == 200:
            assert json.loads(resp.body) == {"data": {}}
        assert "Set-Cookie" not in resp.headers or resp.status == 204
        assert MARK.encode() not in resp.body, "cookie bytes echoed"
    assert session_commands(shared_redis) == {}
    # A write with such a cookie gets a fresh, gateway-made id.
    body = b'{"a": 1}'
    resp = await send_raw(gw.port, request_bytes("PATCH", SESSION, cookie, b"X-CSRF: 1", body=body))
    if resp.status != 400:
        assert resp.status == 200
        (set_cookie,) = resp.headers.getall("Set-Cookie")
        assert MARK not in set_cookie and set_cookie.startswith("agent_sid=")
        assert len(stored_keys(shared_redis)) == 1


# -- B3, B4: ':' and glob characters cannot build or alias a key -----------------------------


async def test_B03_B04_colons_and_glob_characters_never_build_a_key(
    gw: RunningGateway, shared_redis: RedisServer
) -> None:
    """App `a` + sid `b:c` and app `a:b` + sid `c` would be the same Redis key if either
    got through; `*`, `?`, `[` would be dangerous in any SCAN MATCH. Both are refused before
    any store call: the sid is "no session", the application id is a 400."""
    reset_stats(shared_redis)
    for sid in ("b:" + "c" * 41, "*" * 43, "?" * 43, "[" + "a" * 41 + "]", "a" * 42 + ":"):
        resp = await send_raw(
            gw.port, request_bytes("GET", SESSION, f"Cookie: agent_sid={sid}".encode())
        )
        assert (resp.status, json.loads(resp.body)) == (200, {"data": {}})
    for app_id in ("shop:b", "shop%3Ab", "sh*p", "sh%3Fp", "sh%5Bp", "sh%2Ap"):
        target = f"/apps/{app_id}/session"
        resp = await send_raw(
            gw.port, request_bytes("GET", target, b"Cookie: agent_sid=" + b"c" * 43)
        )
        assert resp.status == 400, (app_id, resp)
        assert json.loads(resp.body)["error"]["code"] == "invalid_application_id"
    assert session_commands(shared_redis) == {}
    assert stored_keys(shared_redis) == []


# -- B6: duplicate cookies -------------------------------------------------------------------


async def test_B06_duplicate_cookies_resolve_to_exactly_one_session_never_a_mix(
    gw: RunningGateway, shared_redis: RedisServer
) -> None:
    """`agent_sid=A; agent_sid=B` (cookie tossing: a cookie planted by a sibling subdomain or
    by script): two distinct session ids count as no session (`app.sessions.cookies`), in one
    header or split over two. Neither session is read or written; a write starts a fresh one.
    A value that cannot be a session id is ignored (`agent_sid=A; agent_sid=junk` is A). Its
    cookies carry no `Domain`. (Issue 12 row 3; before it, the last value of the first header
    won, so a planted `Path=/` cookie was used whole.)"""
    sid_a = await new_session(gw, {"who": "a"})
    sid_b = await new_session(gw, {"who": "b"})
    duplicates = [
        [f"Cookie: agent_sid={sid_a}; agent_sid={sid_b}".encode()],
        [f"Cookie: agent_sid={sid_b}; agent_sid={sid_a}".encode()],
        [f"Cookie: agent_sid={sid_a}".encode(), f"Cookie: agent_sid={sid_b}".encode()],
    ]
    junk = [f"Cookie: agent_sid={sid_a}; agent_sid=junk{MARK}".encode()]
    resp = await send_raw(gw.port, request_bytes("GET", SESSION, *junk))
    assert resp.status == 200 and json.loads(resp.body)["data"] == {"who": "a"}
    assert MARK.encode() not in resp.body
    for headers in duplicates:
        resp = await send_raw(gw.port, request_bytes("GET", SESSION, *headers))
        assert resp.status == 200
        assert json.loads(resp.body)["data"] == {}
    for n, headers in enumerate(duplicates):
        body = json.dumps({"n": n}).encode()
        resp = await send_raw(
            gw.port, request_bytes("PATCH", SESSION, *headers, b"X-CSRF: 1", body=body)
        )
        assert resp.status == 200
        assert json.loads(resp.body)["data"] == {"n": n}  # a fresh session, neither a nor b
        (set_cookie,) = resp.headers.getall("Set-Cookie")
        assert sid_a not in set_cookie and sid_b not in set_cookie
        assert "domain" not in set_cookie.lower()
    a, b = await data_of(gw, sid_a), await data_of(gw, sid_b)
    assert a == {"who": "a"} and b == {"who": "b"}, "a session was written through duplicates"
    assert len(stored_keys(shared_redis)) == 2 + len(duplicates)


# -- B8: application id traversal (raw targets, no client normalisation) --------------------

TRAVERSAL_TARGETS = [
    "/apps/%2e%2e/session",
    "/apps/..%2fshop/session",
    "/apps/%2e%2e%2fshop/session",
    "/apps/shop%2f..%2fother/session",
    "/apps/a%5cb/session",
    "/apps/a\\b/session",
    "/apps/%40evil.example/session",
    "/apps/shop@evil/session",
    "/apps//session",
    "/apps/%20/session",
    "/apps/" + "a" * 64 + "/session",
    "/apps/SHOP/session",
    "/apps/sh%C3%B6p/session",
    "/apps/shop%00/session",
    "/apps/shop%0a/session",
    "/apps/shop%0d%0aX-Evil:%201/session",
    "/apps/-shop/session",
    "/apps/zz/session",
    "/apps/%2e%2e/agent/x",
    "/apps/shop%2f..%2fother/agent/x",
    "/apps/zz/agent/x",
    "/apps/sh%2Fop/agent/x",
]


@pytest.mark.parametrize("target", TRAVERSAL_TARGETS)
async def test_B08_traversal_and_unknown_application_ids_are_refused_before_anything(
    gw: RunningGateway, upstream: ServedUpstream, shared_redis: RedisServer, target: str
) -> None:
    reset_stats(shared_redis)
    cookie = b"Cookie: agent_sid=" + SID_A.encode()
    resp = await send_raw(gw.port, request_bytes("POST", target, cookie, b"X-CSRF: 1", body=b"{}"))
    assert resp.status in (400, 404, 405), resp
    error = json.loads(resp.body)["error"]
    assert error["code"] in (
        "invalid_application_id",
        "unknown_application",
        "not_found",
        "method_not_allowed",
    )
    assert b"evil" not in resp.body.lower() and b"X-Evil" not in resp.body
    assert session_commands(shared_redis) == {}
    assert upstream.fake.seen == [], "a refused request reached the upstream"


# -- B10: huge bodies ------------------------------------------------------------------------

TWO_MIB = 2 * 1024 * 1024


async def chunks(size: int) -> AsyncIterator[bytes]:
    piece = b'{"a": "' + b"x" * 65_000
    sent = 0
    while sent < size:
        yield piece
        sent += len(piece)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_B10_a_huge_body_is_413_and_changes_nothing(
    gw: RunningGateway, upstream: ServedUpstream, shared_redis: RedisServer, framing: str
) -> None:
    sid = await new_session(gw, {"keep": 1})
    cookie = {"Cookie": f"agent_sid={sid}"}
    for path in (SESSION, f"{AGENT}/upload"):
        body: io.BytesIO | AsyncIterator[bytes] = (
            io.BytesIO(b"x" * TWO_MIB) if framing == "content-length" else chunks(TWO_MIB)
        )
        method = "PATCH" if path == SESSION else "POST"
        async with gw.client.request(method, path, data=body, headers={**CSRF, **cookie}) as resp:
            assert resp.status == 413, path
            assert (await resp.json())["error"]["code"] == "body_too_large"
            assert "Set-Cookie" not in resp.headers
    assert await data_of(gw, sid) == {"keep": 1}
    if framing == "content-length":
        assert upstream.fake.seen == [], "the declared length is refused before the upstream"
    assert len(stored_keys(shared_redis)) == 1


# -- B11: compressed request bodies are never expanded --------------------------------------


def gzip_of(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def gzip_bomb(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1024 * 1024)
    return b"".join(compressor.compress(zeros) for _ in range(size // len(zeros))) + (
        compressor.flush()
    )


async def test_B11_compressed_session_bodies_are_not_decompressed(gw: RunningGateway) -> None:
    sid = await new_session(gw, {"keep": 1})
    headers = {**CSRF, "Cookie": f"agent_sid={sid}", "Content-Encoding": "gzip"}
    for body in (gzip_of(b'{"a": 1}'), gzip_bomb(64 * 1024 * 1024)):
        async with gw.client.patch(SESSION, data=body, headers=headers) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "invalid_json"
    assert await data_of(gw, sid) == {"keep": 1}


async def test_B11_compressed_agent_bodies_reach_the_upstream_byte_for_byte(
    aiohttp_server: AiohttpServer, shared_redis: RedisServer
) -> None:
    """Before the fix the gateway's server decompressed the body, then forwarded the plain
    bytes still labelled `gzip` and cut to the compressed Content-Length."""
    fake = FakeUpstream()
    # The upstream must not decompress either, to see the bytes exactly as they arrive.
    upstream = ServedUpstream(fake, await aiohttp_server(fake.app, auto_decompress=False))
    env = {"SESSION_STORE": "redis", "REDIS_URL": shared_redis.url}
    async with run_gateway(app_settings(upstream.base, env)) as gw:
        for body in (gzip_of(b'{"input": "' + b"hello " * 1000 + b'"}'), gzip_bomb(64 * 2**20)):
            headers = {**CSRF, "Content-Encoding": "gzip", "Content-Type": "application/json"}
            async with gw.client.post(f"{AGENT}/echo", data=body, headers=headers) as resp:
                assert resp.status == 200
                assert (await resp.json())["body_bytes"] == len(body)
            seen = fake.last
            assert seen.body == body
            assert seen.headers["Content-Encoding"] == "gzip"
            assert seen.headers["Content-Length"] == str(len(body))


# -- B17: CR/LF and control characters never reach upstream headers -------------------------


async def test_B17_a_stored_value_with_crlf_never_becomes_an_upstream_header(
    gw: RunningGateway, upstream: ServedUpstream, shared_redis: RedisServer
) -> None:
    sid = await new_session(gw, {"keep": 1})
    cookie = {"Cookie": f"agent_sid={sid}"}
    async with gw.client.post(f"{AGENT}/x", headers={**CSRF, **cookie}) as resp:
        assert resp.status == 200
    thread = upstream.fake.last.headers["X-Agent-Thread-Id"]
    with contextlib.closing(shared_redis.client()) as client:
        (key,) = client.keys("agent:sess:*")
        raw = client.get(key)
        assert isinstance(raw, bytes)
        value = json.loads(raw)
        value["gw"]["conversation_id"] = thread + "\r\nX-Evil: 1"
        client.set(key, json.dumps(value, separators=(",", ":")), keepttl=True)
    async with gw.client.post(f"{AGENT}/x", headers={**CSRF, **cookie}) as resp:
        assert resp.status == 200
    seen = upstream.fake.last.headers
    assert "X-Evil" not in seen
    assert "\r" not in seen["X-Agent-Thread-Id"] and "\n" not in seen["X-Agent-Thread-Id"]
    assert seen["X-Agent-Thread-Id"] != thread, "a tampered conversation id is replaced"
    assert await data_of(gw, sid) == {"keep": 1}


HEADER_INJECTIONS: dict[str, tuple[bytes, int, str | None]] = {
    # (request header line, status, our error code or None for the parser's own 400)
    "encoded-crlf-in-query": (b"X-Ok: 1", 200, None),
    "control-byte-in-value": (b"X-Test: a\x01b", 400, None),
    "del-in-value": (b"X-Test: a\x7fb", 400, None),
    "nul-in-value": (b"X-Test: a\x00b", 400, None),
    "bare-cr-in-value": (b"X-Test: a\rX-Evil: 1", 400, None),
    "obs-text-in-value": (b"X-Test: a\x80\xffb", 400, "invalid_header"),
    "obs-fold": (b"X-Test: a\r\n X-Evil: 1", 400, None),
}


@pytest.mark.parametrize("case", HEADER_INJECTIONS)
async def test_B17_crlf_and_controls_in_requests_never_reach_upstream_headers(
    gw: RunningGateway, upstream: ServedUpstream, case: str
) -> None:
    line, status, code = HEADER_INJECTIONS[case]
    target = f"{AGENT}/x?q=%0d%0aX-Evil:%201"
    resp = await send_raw(gw.port, request_bytes("GET", target, line))
    assert resp.status == status, resp
    if status == 200:
        seen = upstream.fake.last
        assert "X-Evil" not in seen.headers
        assert seen.raw_path_qs == "/v1/x?q=%0d%0aX-Evil:%201"
    else:
        assert upstream.fake.seen == []
        if code is not None:
            assert json.loads(resp.body)["error"]["code"] == code
    resp = await send_raw(gw.port, request_bytes("GET", f"{AGENT}/a%0d%0aX-Evil:%201"))
    assert resp.status == 400
    assert json.loads(resp.body)["error"]["code"] == "invalid_path"


def test_B17_configured_headers_with_crlf_are_a_configuration_error(tmp_path: Path) -> None:
    apps = tmp_path / "apps.toml"
    apps.write_text(
        '[apps.shop]\nupstream = "http://127.0.0.1:9/v1"\n'
        'headers = { Authorization = "Bearer ${TOKEN}" }\n'
    )
    _, problems = load_apps_file(str(apps), {"TOKEN": "abc\r\nX-Evil: 1"})
    assert any("CR, LF or NUL" in p for p in problems), problems
    assert not any("X-Evil" in p for p in problems), "the secret's bytes were echoed"


# -- B19: odd methods -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["get", "QUERY", "FOO", "PROPFIND", "TRACE", "CONNECT"])
async def test_B19_unknown_and_lower_case_methods_on_session_routes_touch_nothing(
    gw: RunningGateway, shared_redis: RedisServer, method: str
) -> None:
    reset_stats(shared_redis)
    cookie = b"Cookie: agent_sid=" + SID_A.encode()
    target = "127.0.0.1:1" if method == "CONNECT" else SESSION
    resp = await send_raw(gw.port, request_bytes(method, target, cookie, b"X-CSRF: 1"))
    assert resp.status in (400, 403, 404, 405), resp
    assert session_commands(shared_redis) == {}
