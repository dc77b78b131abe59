"""Issue 12 row 6: CSRF for every unsafe method on `/apps/`, not only POST/PUT/PATCH/DELETE.

Only GET, HEAD and OPTIONS are exempt. PROPFIND, QUERY, `get` in lower case and any other
extension method without `X-CSRF: 1` are answered 403 `csrf_header_missing` (the JSON envelope)
and never reach the upstream, nor create a session. Sent through aiohttp's client (which sends
any method) and, for odd tokens, byte for byte over a socket to two real `python -m app`
processes: aiohttp's C parser (llhttp) refuses methods it does not know with its own 400 before
any handler runs; the pure-Python parser (`AIOHTTP_NO_EXTENSIONS=1`) accepts any token, and
there the CSRF check is what stops them.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import CSRF
from tests.fake_upstream import RunningGateway, ServedUpstream, raw_request
from tests.test_http_parsers import (  # noqa: F401 (module fixtures: one process per parser)
    Gateway,
    exchange,
    gateway,
    recorder,
    statuses,
)

AGENT = "/apps/shop/agent"
# Methods that were let through without the header before (only POST/PUT/PATCH/DELETE were
# checked): WebDAV, the QUERY draft, and made-up extension tokens.
UNSAFE_METHODS = ("PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "QUERY", "PURGE")
# Tokens an HTTP client library might refuse or normalise; none is GET, HEAD or OPTIONS (the
# pure-Python parser upper-cases methods, so `Post` arrives as POST there).
UNSAFE_ODD_TOKENS = ("Post", "propfind", "FOO_BAR", "M-SEARCH", "X!#$%&'*+.^`|~1")


def error_code(body: bytes) -> str:
    code: str = json.loads(body)["error"]["code"]
    return code


@pytest.mark.parametrize("method", UNSAFE_METHODS)
async def test_unsafe_methods_without_the_header_are_403_and_reach_nothing(
    upstream: ServedUpstream, gw: RunningGateway, method: str
) -> None:
    async with gw.client.request(method, f"{AGENT}/items", data=b"<x/>") as resp:
        assert resp.status == 403, method
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert body["error"]["code"] == "csrf_header_missing"
        assert body["error"]["request_id"] == resp.headers["X-Request-Id"]
        assert "Set-Cookie" not in resp.headers  # no session created either
    assert upstream.fake.seen == []


def raw(method: str, *headers: str) -> bytes:
    head = [f"{method} {AGENT}/items HTTP/1.1", "Host: 127.0.0.1", *headers, "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


def test_odd_method_tokens_on_both_parsers_never_pass_without_the_header(
    gateway: Gateway,  # noqa: F811
) -> None:
    gateway.recorder.clear()
    for method in UNSAFE_ODD_TOKENS:
        answer = asyncio.run(exchange(gateway.proc.port, raw(method)))
        status = statuses(answer)
        if gateway.parser == "c-parser" and status == [400]:
            continue  # llhttp refused the token itself: no handler ran
        assert status == [403], (gateway.parser, method, answer[:300])
        body = answer.partition(b"\r\n\r\n")[2]
        assert error_code(body) == "csrf_header_missing"
    assert gateway.recorder.paths() == []
    # The pure-Python parser passes such tokens on, upper-cased: with the header they are
    # proxied (those the recording upstream's own C parser knows are seen there).
    if gateway.parser == "python-parser":
        known = ("Post", "propfind", "M-SEARCH")
        for method in known:
            answer = asyncio.run(exchange(gateway.proc.port, raw(method, "X-CSRF: 1")))
            assert statuses(answer) == [200], (method, answer[:300])
        assert gateway.recorder.paths() == [f"{m.upper()} /v1/items" for m in known]


@pytest.mark.parametrize("method", ("PROPFIND", "QUERY", "PURGE"))
async def test_unsafe_methods_with_the_header_go_upstream(
    upstream: ServedUpstream, gw: RunningGateway, method: str
) -> None:
    async with gw.client.request(method, f"{AGENT}/items", headers=CSRF) as resp:
        assert resp.status == 200, method
    assert [seen.method for seen in upstream.fake.seen] == [method]


async def test_get_head_and_options_stay_exempt(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    for method in ("GET", "HEAD", "OPTIONS"):
        async with gw.client.request(method, f"{AGENT}/items") as resp:
            assert resp.status == 200, method
    assert [seen.method for seen in upstream.fake.seen] == ["GET", "HEAD", "OPTIONS"]


async def test_unsafe_methods_on_the_session_api_never_touch_it(gw: RunningGateway) -> None:
    """The session routes answer only their own methods; an extension method there is refused
    (403 without the header, 405 with it), never a session read or write."""
    resp = await raw_request(gw.url, "/apps/shop/session", method="PROPFIND")
    assert resp.status in (403, 405)
    assert "set-cookie" not in {k.lower() for k in resp.headers}
    resp = await raw_request(gw.url, "/apps/shop/session", method="PROPFIND", headers=CSRF)
    assert resp.status == 405
