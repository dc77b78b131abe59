"""Issue 12, rows 2, 4 and 5 (docs/reliability.md I2, I4, I5) over HTTP, in process: what an
upstream may not set on the gateway's origin, which statuses are relayed, and which forwarding
headers reach the upstream. The same through the shipped nginx: tests/test_nginx_conf.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from app.forwarding import client_ip, forwarded_chain
from app.proxy.header_policy import (
    DEFAULT_FORWARDED,
    NEVER_FORWARDED,
    NEVER_RELAYED,
    REQUESTS,
    RESPONSES,
    header_policy,
)
from app.proxy.headers import PROXIED_CSP, browser_response_headers
from tests.fake_upstream import (
    RunningGateway,
    ServedUpstream,
    app_settings,
    raw_request,
    run_gateway,
)

AGENT = "/apps/shop/agent"

# (header, value) an upstream might send to take over something beyond its own answer.
HOSTILE_RESPONSE_HEADERS = [
    ("Clear-Site-Data", '"cookies", "storage", "cache"'),
    ("Set-Cookie", "agent_sid=planted; Path=/"),
    ("Set-Cookie2", "x=1"),
    ("Service-Worker-Allowed", "/"),
    ("Refresh", "0; url=/apps/other/agent/x"),
    ("Link", "</apps/other/agent/x>; rel=preload; as=fetch"),
    ("Link", "</apps/other/agent/x>; rel=prefetch"),
    ("Link", "</apps/other/agent/x.css>; rel=stylesheet"),
    ("Link", '<https://evil.example>; rel="preconnect"'),
    ("Link", "</next>; rel=\"next\", </x.css>; rel='stylesheet'"),
    ("Link", "</apps/other/agent/x>; rel*=UTF-8''preload"),
    ("Link", "</apps/other/agent/x>; rel=next; rel=prefetch"),
    # Chromium reads an unquoted value up to the next `;` or `,`, then splits it on whitespace.
    ("Link", "</apps/other/agent/x>; rel=next preload; as=image"),
    ("Link", "</apps/other/agent/x>; rel=next\tpreload; as=image"),
    ("Link", "<https://evil.example>; rel=next preconnect"),
    ("Content-Security-Policy", "sandbox allow-scripts allow-same-origin"),
    ("Content-Security-Policy-Report-Only", "default-src 'none'; report-uri https://evil.example"),
    ("Permissions-Policy", "camera=*"),
    ("Origin-Agent-Cluster", "?0"),
    ("Cross-Origin-Opener-Policy", "unsafe-none"),
    ("Cross-Origin-Embedder-Policy", "require-corp"),
    ("Alt-Svc", 'h2="evil.example:443"; ma=86400'),
    ("Strict-Transport-Security", "max-age=0; includeSubDomains"),
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Credentials", "true"),
    ("Timing-Allow-Origin", "*"),
    ("X-Frame-Options", "ALLOWALL"),
    ("X-XSS-Protection", "1; report=https://evil.example"),
    ("X-Content-Type-Options", "sniff-please"),
    ("NEL", '{"report_to": "evil", "max_age": 86400}'),
    ("Report-To", '{"group": "evil", "endpoints": [{"url": "https://evil.example"}]}'),
    ("Reporting-Endpoints", 'evil="https://evil.example"'),
    ("Accept-CH", "Sec-CH-UA-Full-Version-List"),
    ("Critical-CH", "Sec-CH-UA-Model"),
    ("Speculation-Rules", '"/apps/other/agent/rules.json"'),
    ("Use-As-Dictionary", 'match="/apps/*"'),
    ("Set-Login", "logged-in"),
    ("IdP-SignIn-Status", "action=signin"),
    ("Allow-CSP-From", "*"),
    ("Sec-Session-Registration", '(ES256);path="/apps/other";challenge="x"'),
    ("X-Accel-Redirect", "/metrics"),
    ("X-Accel-Buffering", "yes"),
    ("X-Accel-Limit-Rate", "1"),
    ("X-Sendfile", "/etc/passwd"),
    ("X-LIGHTTPD-send-file", "/etc/passwd"),
    ("X-Envoy-Immediate-Health-Check-Fail", "true"),
    ("WWW-Authenticate", 'Basic realm="Sign in to every app"'),
    ("WWW-Authenticate", 'Bearer realm="api", Digest realm="x"'),
    ("Server", "upstream/1.2.3 (secret build)"),
    ("X-Session-Rotate", "0"),
]

# What agent APIs send and their clients read: passes unchanged.
KEPT_RESPONSE_HEADERS = [
    ("Cache-Control", "private, max-age=5"),
    ("Vary", "Accept"),
    ("ETag", '"v1"'),
    ("Content-Disposition", 'attachment; filename="report.csv"'),
    ("Content-Language", "fr"),
    ("Retry-After", "3"),
    ("X-RateLimit-Remaining", "41"),
    ("Server-Timing", "model;dur=120"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Link", '</v1/items?page=2>; rel="next", </v1/items?page=9>; rel=last'),
    ("WWW-Authenticate", 'Bearer realm="api", error="invalid_token"'),
]
# Vendor and custom headers: relayed only when the application lists them
# (`relay_response_headers`); `CONFIGURED_RELAY` lists these.
VENDOR_RESPONSE_HEADERS = [
    ("openai-processing-ms", "120"),
    ("OpenAI-Version", "2020-10-01"),
    ("X-Upstream-Custom", "kept"),
]
CONFIGURED_RELAY = ["OpenAI-*", "X-Upstream-Custom"]


def answer_with(*headers: tuple[str, str]) -> web.Response:
    response = web.json_response({"ok": True})
    for name, value in headers:
        response.headers.add(name, value)
    return response


@pytest.mark.parametrize(("name", "value"), HOSTILE_RESPONSE_HEADERS)
async def test_I2_an_upstream_cannot_set_origin_wide_headers(
    upstream: ServedUpstream, gw: RunningGateway, name: str, value: str
) -> None:
    async def hostile(request: web.Request) -> web.Response:
        return answer_with((name, value))

    upstream.fake.on("/v1/hostile", hostile)
    resp = await raw_request(gw.url, f"{AGENT}/hostile")
    assert resp.status == 200 and resp.body == b'{"ok": true}'
    relayed = resp.headers.getall(name, [])
    if name.lower() == "set-cookie":
        # The only cookie is the gateway's own session cookie (minted by this first agent call).
        assert [c.split("=", 1)[0] for c in relayed] == ["agent_sid"]
        assert all("planted" not in c for c in relayed)
    elif name.lower() == "content-security-policy":
        assert relayed == [PROXIED_CSP]
    elif name.lower() == "x-content-type-options":
        assert relayed == ["nosniff"]
    elif name.lower() == "server":
        assert value not in relayed
    else:
        assert relayed == [], f"{name}: {value} reached the browser"


async def test_I2_what_agent_apis_send_passes_unchanged(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async def api(request: web.Request) -> web.Response:
        return answer_with(*KEPT_RESPONSE_HEADERS, *VENDOR_RESPONSE_HEADERS)

    upstream.fake.on("/v1/api", api)
    resp = await raw_request(gw.url, f"{AGENT}/api")
    assert resp.status == 200
    for name, value in KEPT_RESPONSE_HEADERS:
        assert value in resp.headers.getall(name, []), f"{name}: {value} was dropped"
    # An allowlist: what the application did not list is not relayed.
    for name, _ in VENDOR_RESPONSE_HEADERS:
        assert name not in resp.headers, f"{name} relayed without being listed"
    assert resp.headers["Content-Security-Policy"] == PROXIED_CSP
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_I2_an_application_lists_the_vendor_headers_it_relays(
    upstream: ServedUpstream,
) -> None:
    relay, problems = header_policy(RESPONSES, CONFIGURED_RELAY, "test")
    assert problems == []

    async def api(request: web.Request) -> web.Response:
        return answer_with(*VENDOR_RESPONSE_HEADERS, ("Clear-Site-Data", "*"), ("X-Other", "1"))

    upstream.fake.on("/v1/api", api)
    async with run_gateway(app_settings(upstream.base, relay=relay)) as gw:
        resp = await raw_request(gw.url, f"{AGENT}/api")
    assert resp.status == 200
    for name, value in VENDOR_RESPONSE_HEADERS:
        assert resp.headers.getall(name, []) == [value], name
    assert "X-Other" not in resp.headers and "Clear-Site-Data" not in resp.headers


@pytest.mark.parametrize(
    "entry",
    [
        "Clear-Site-Data",
        "Set-Cookie",
        "Access-Control-Allow-Origin",
        "Access-Control-*",
        "Content-Security-Policy-Report-Only",
        "X-Accel-*",
        "X-Accel-Redirect",
        "Sec-*",
        "Server",
        "Connection",
        "X_Custom",
        "Bad Name",
    ],
)
def test_I2_apps_file_cannot_reopen_the_floor(entry: str) -> None:
    _, problems = header_policy(RESPONSES, [entry], "APPS_FILE [apps.shop]")
    assert len(problems) == 1 and "relay_response_headers" in problems[0], problems


def test_I2_a_star_relays_every_name_but_the_floor() -> None:
    relay, problems = header_policy(RESPONSES, ["*"], "test")
    assert problems == []
    upstream: CIMultiDict[str] = CIMultiDict(
        [(n, "1") for n in ("X-Anything", "Anthropic-Ratelimit-Requests-Remaining")]
        + [(name, value) for name, value in HOSTILE_RESPONSE_HEADERS]
    )
    out = browser_response_headers(CIMultiDictProxy(upstream), relay)
    relayed = {name.lower() for name in out}
    assert {"x-anything", "anthropic-ratelimit-requests-remaining"} <= relayed
    for name, value in HOSTILE_RESPONSE_HEADERS:
        lower = name.lower()
        if lower in ("content-security-policy", "x-content-type-options"):
            assert out.getall(name) != [value]
        elif lower in ("link", "www-authenticate"):
            assert value not in out.getall(name, [])
        else:
            assert lower not in relayed, name


@pytest.mark.parametrize("status", [200, 204, 304, 404, 500])
async def test_I1_every_relayed_status_carries_the_inert_policy(
    upstream: ServedUpstream, gw: RunningGateway, status: int
) -> None:
    async def any_status(request: web.Request) -> web.Response:
        return web.Response(
            status=status, headers={"Content-Security-Policy": "sandbox allow-scripts"}
        )

    upstream.fake.on("/v1/status", any_status)
    resp = await raw_request(gw.url, f"{AGENT}/status")
    assert resp.status == status
    assert resp.headers.getall("Content-Security-Policy") == [PROXIED_CSP]
    assert resp.headers.getall("X-Content-Type-Options") == ["nosniff"]


@pytest.mark.parametrize(
    ("content_type", "disposition", "expected"),
    [
        ("text/html; charset=utf-8", None, "attachment"),
        ("TEXT/HTML", "inline", "attachment"),
        ("application/xhtml+xml", 'inline; filename="r.xhtml"', 'attachment; filename="r.xhtml"'),
        ("image/svg+xml", None, "attachment"),
        ("application/xml", None, "attachment"),
        ("application/atom+xml", None, "attachment"),
        ("multipart/x-mixed-replace; boundary=x", None, "attachment"),
        ("application/pdf", 'attachment; filename="a.pdf"', 'attachment; filename="a.pdf"'),
        ("", None, "attachment"),
        ("text/plain, text/html", None, "attachment"),
        ('application/json; x=",", text/html', None, "attachment"),
        ("text/html x", None, "attachment"),
        ("texthtml", None, "attachment"),
        ("application/vnd.api+json; charset=utf-8", None, None),
        ("application/json", None, None),
        ("text/event-stream", None, None),
        ("text/plain", 'inline; filename="a.txt"', 'inline; filename="a.txt"'),
        ("image/png", None, None),
    ],
)
async def test_I1_a_page_type_is_a_download_never_a_page_of_the_origin(
    upstream: ServedUpstream,
    gw: RunningGateway,
    content_type: str,
    disposition: str | None,
    expected: str | None,
) -> None:
    async def typed(request: web.Request) -> web.Response:
        headers = {"Content-Type": content_type}
        if disposition is not None:
            headers["Content-Disposition"] = disposition
        return web.Response(body=b"<x/>", headers=headers)

    upstream.fake.on("/v1/typed", typed)
    resp = await raw_request(gw.url, f"{AGENT}/typed")
    assert resp.status == 200 and resp.body == b"<x/>"
    assert resp.headers.getall("Content-Disposition", []) == ([expected] if expected else [])


def test_I2_the_response_filter_is_case_blind_and_honours_connection() -> None:
    upstream: CIMultiDict[str] = CIMultiDict(
        [
            ("CLEAR-SITE-DATA", "*"),
            ("x-AcCeL-rEdIrEcT", "/x"),
            ("Connection", "X-Hop"),
            ("X-Hop", "1"),
            ("Link", '<https://x.example/?rel=next>; rel="next preload"'),
            ("X-Kept", "1"),
        ]
    )
    out = browser_response_headers(
        CIMultiDictProxy(upstream), header_policy(RESPONSES, ["*"], "t")[0]
    )
    assert list(out.keys()) == ["X-Kept", "Content-Security-Policy", "X-Content-Type-Options"]


@pytest.mark.parametrize(
    "link",
    [
        "</apps/b/agent/x>; rel=next preload; as=image",
        "</apps/b/agent/x>; rel=next\tpreload; as=image",
        "</apps/b/agent/x>; rel = next  dns-prefetch",
        '</apps/b/agent/x>; rel="next" preload',
        "</v1/items?page=2>; rel=next, </apps/b/agent/x>; rel=prev modulepreload",
    ],
)
def test_I2_an_unquoted_rel_is_read_to_the_next_separator_as_chromium_does(link: str) -> None:
    """Issue 12 attack D: `rel=next preload` used to be read as "next" only."""
    out = browser_response_headers(CIMultiDictProxy(CIMultiDict({"Link": link})))
    assert "Link" not in out, f"{link!r} was relayed"


@pytest.mark.parametrize(
    "link",
    [
        "</v1/items?page=2>; rel=next last",
        '</v1/items?page=2>; rel="next"; title="a, b; c"',
        "</v1/items?page=2>; rel=next , </v1/items?page=1>; rel=prev",
    ],
)
def test_I2_navigational_links_still_pass(link: str) -> None:
    out = browser_response_headers(CIMultiDictProxy(CIMultiDict({"Link": link})))
    assert out.getall("Link") == [link]


# -- I4: statuses ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_upstream(status_line: bytes, extra: bytes = b"") -> AsyncIterator[str]:
    """An upstream that answers every request with `status_line` (+ `extra` head lines), no
    body, and keeps the connection open; yields its base URL."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(status_line + b"\r\n" + extra + b"Content-Length: 0\r\n\r\n")
            await writer.drain()
            await reader.read()  # hold it open: a tunnel would carry bytes from here on
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


@pytest.mark.parametrize(
    ("status_line", "extra"),
    [
        (b"HTTP/1.1 101 Switching Protocols", b"Connection: Upgrade\r\nUpgrade: tunnel\r\n"),
        (b"HTTP/1.1 600 Beyond", b""),
        (b"HTTP/1.1 999 Beyond", b""),
    ],
)
async def test_I4_only_final_statuses_are_relayed(status_line: bytes, extra: bytes) -> None:
    async with raw_upstream(status_line, extra) as base, run_gateway(app_settings(base)) as gw:
        resp = await raw_request(
            gw.url,
            f"{AGENT}/upgrade",
            headers=[("Connection", "close"), ("Upgrade", "tunnel")],
        )
    assert resp.status == 502
    assert b'"upstream_protocol_error"' in resp.body
    assert "Upgrade" not in resp.headers


@pytest.mark.parametrize("status", [200, 599])
async def test_I4_the_edges_of_the_final_range_are_relayed(status: int) -> None:
    async with (
        raw_upstream(f"HTTP/1.1 {status} Edge".encode()) as base,
        run_gateway(app_settings(base)) as gw,
    ):
        resp = await raw_request(gw.url, f"{AGENT}/edge")
    assert resp.status == status


# -- I5: forwarding headers ----------------------------------------------------------------------

# What a browser (or anything in front of the gateway) might send to make the upstream believe
# another client, scheme, host, path, method or identity.
HOSTILE_FORWARDING = [
    ("Forwarded", "for=198.51.100.7;proto=https;host=evil.example"),
    ("X-Forwarded-For", "198.51.100.7"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Ssl", "on"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X-Forwarded-Server", "evil.example"),
    ("X-Forwarded-Scheme", "https"),
    ("X-Forwarded-Uri", "/admin"),
    ("X-Forwarded-User", "admin"),
    ("X-Real-IP", "198.51.100.7"),
    ("True-Client-IP", "198.51.100.7"),
    ("X-Client-IP", "198.51.100.7"),
    ("X-Cluster-Client-IP", "198.51.100.7"),
    ("CF-Connecting-IP", "198.51.100.7"),
    ("CF-Visitor", '{"scheme":"https"}'),
    ("Fastly-Client-IP", "198.51.100.7"),
    ("X-Original-URL", "/admin"),
    ("X-Rewrite-URL", "/admin"),
    ("X-Original-Forwarded-For", "198.51.100.7"),
    ("X-Host", "evil.example"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("Remote-User", "admin"),
    ("X-Remote-User", "admin"),
    ("X-Auth-Request-Email", "admin@example.com"),
    ("X-Amzn-Oidc-Identity", "admin"),
    ("X-Goog-Authenticated-User-Email", "admin@example.com"),
    ("X-MS-Client-Principal-Name", "admin"),
    ("X-SSL-Client-Verify", "SUCCESS"),
    ("X-Client-Cert", "forged"),
    ("X-Envoy-Internal", "true"),
    ("X_Agent_Thread_Id", "browser-thread"),
    ("X_Forwarded_For", "198.51.100.7"),
    ("X_Real_IP", "198.51.100.7"),
    ("x_application_id", "another-app"),
    ("Proxy", "http://198.51.100.7:3128"),
    ("X.Forwarded.For", "198.51.100.7"),
    ("X~Real~IP", "198.51.100.7"),
    # Gaps of the former deny list (outside review, attack C): what Java, PHP and Django
    # "client IP" snippets and PaaS front ends read.
    ("Proxy-Client-IP", "198.51.100.7"),
    ("WL-Proxy-Client-IP", "198.51.100.7"),
    ("X-Forwarded", "for=198.51.100.7"),
    ("Forwarded-For", "198.51.100.7"),
    ("X-Forward-For", "198.51.100.7"),
    ("X-Azure-ClientIP", "198.51.100.7"),
    ("X-Azure-SocketIP", "198.51.100.7"),
    ("X-Appengine-User-IP", "198.51.100.7"),
    ("Fly-Client-IP", "198.51.100.7"),
    ("Ali-CDN-Real-IP", "198.51.100.7"),
    ("X-User", "admin"),
    ("Via", "1.1 trusted-internal-proxy"),
]
FORWARDED_NAMES = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"}


def forwarding_seen(headers: CIMultiDict[str]) -> dict[str, list[str]]:
    """The hostile names that reached the upstream, with their values (ours included)."""
    names = {n.lower() for n, _ in HOSTILE_FORWARDING}
    return {n.lower(): headers.getall(n) for n in headers if n.lower() in names}


@pytest.mark.parametrize("trusted", ["", "127.0.0.0/8"])
async def test_I5_only_the_gateways_own_forwarding_headers_reach_the_upstream(
    upstream: ServedUpstream, trusted: str
) -> None:
    """Untrusted peer, or a peer in `TRUSTED_PROXIES` that passed the browser's headers on."""
    env = {"TRUSTED_PROXIES": trusted} if trusted else {}
    async with run_gateway(app_settings(upstream.base, env)) as gw:
        resp = await raw_request(gw.url, f"{AGENT}/chat", headers=HOSTILE_FORWARDING)
    assert resp.status == 200
    seen = upstream.fake.last.headers
    assert set(forwarding_seen(seen)) == FORWARDED_NAMES
    if trusted:
        # Loopback is trusted, so the browser's 198.51.100.7 is the untrusted hop believed;
        # the proto and host are the trusted proxy's word.
        assert seen.getall("X-Forwarded-For") == ["198.51.100.7, 127.0.0.1"]
        assert seen.getall("X-Real-IP") == ["198.51.100.7"]
        assert seen.getall("X-Forwarded-Proto") == ["https"]
        assert seen.getall("X-Forwarded-Host") == ["evil.example"]
    else:
        assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
        assert seen.getall("X-Real-IP") == ["127.0.0.1"]
        assert seen.getall("X-Forwarded-Proto") == ["http"]
        assert seen.getall("X-Forwarded-Host") == [f"127.0.0.1:{gw.port}"]
    assert seen.getall("X-Application-Id") == ["shop"]
    assert "browser-thread" not in seen.values()
    assert not [n for n in seen if not n.replace("-", "").isalnum()]


async def test_I5_a_spoofed_chain_is_cut_at_the_first_untrusted_hop(
    upstream: ServedUpstream,
) -> None:
    settings = app_settings(upstream.base, {"TRUSTED_PROXIES": "127.0.0.0/8, 10.0.0.0/8"})
    async with run_gateway(settings) as gw:
        resp = await raw_request(
            gw.url,
            f"{AGENT}/chat",
            headers=[("X-Forwarded-For", "6.6.6.6, 203.0.113.9, 10.1.2.3")],
        )
    assert resp.status == 200
    seen = upstream.fake.last.headers
    assert seen.getall("X-Forwarded-For") == ["203.0.113.9, 10.1.2.3, 127.0.0.1"]
    assert seen.getall("X-Real-IP") == ["203.0.113.9"]


async def test_I5_every_line_of_x_forwarded_for_counts(upstream: ServedUpstream) -> None:
    """A proxy that adds its hop as a header line of its own: the client's line comes first and
    must not be believed."""
    settings = app_settings(upstream.base, {"TRUSTED_PROXIES": "127.0.0.0/8"})
    async with run_gateway(settings) as gw:
        resp = await raw_request(
            gw.url,
            f"{AGENT}/chat",
            headers=[("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "203.0.113.9")],
        )
    assert resp.status == 200
    seen = upstream.fake.last.headers
    assert seen.getall("X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]
    assert seen.getall("X-Real-IP") == ["203.0.113.9"]


def test_I5_the_request_filter_covers_the_documented_names() -> None:
    """Not on the allowlist, and refused by the floor even for an application that forwards
    every other name (`forward_request_headers = ["*"]`)."""
    everything, problems = header_policy(REQUESTS, ["*"], "test")
    assert problems == []
    for name, _ in HOSTILE_FORWARDING:
        assert name.lower() not in DEFAULT_FORWARDED, name
        assert not everything.allows(name.lower()), name
    assert everything.allows("x-custom") and everything.allows("anthropic-beta")
    # The gateway's own headers are in the floor (the browser's copies never pass) ...
    assert {"x-agent-thread-id", "x-application-id", "x-request-id", "cookie"} <= NEVER_FORWARDED
    assert not any(everything.allows(name) for name in NEVER_FORWARDED)
    # ... and no response filter entry names something agent APIs need.
    assert not {"content-type", "cache-control", "location", "retry-after"} & NEVER_RELAYED


@pytest.mark.parametrize(
    ("peer", "xff", "chain"),
    [
        ("203.0.113.1", "6.6.6.6", ["203.0.113.1"]),  # untrusted peer: its word is not taken
        ("10.0.0.2", "", ["10.0.0.2"]),
        ("10.0.0.2", "6.6.6.6, 198.51.100.4", ["198.51.100.4", "10.0.0.2"]),
        ("10.0.0.2", "198.51.100.4, 10.0.0.9", ["198.51.100.4", "10.0.0.9", "10.0.0.2"]),
        ("10.0.0.2", "10.0.0.8, 10.0.0.9", ["10.0.0.8", "10.0.0.9", "10.0.0.2"]),
        ("10.0.0.2", "junk, 10.0.0.9", ["10.0.0.2"]),
        ("10.0.0.2", "2001:db8::1", ["2001:db8::1", "10.0.0.2"]),
        ("10.0.0.2", "fe80::1%eth0 x, 10.0.0.9", ["10.0.0.2"]),
        ("10.0.0.2", "198.51.100.4, fe80::1%1", ["10.0.0.2"]),
    ],
)
def test_I5_the_believed_chain_starts_with_the_client_address(
    peer: str, xff: str, chain: list[str]
) -> None:
    trusted = [ipaddress.ip_network("10.0.0.0/8")]
    headers = {"X-Forwarded-For": xff} if xff else {}
    request = make_mocked_request("GET", "/", headers=headers)
    with mock.patch.object(type(request), "remote", new=peer):
        assert forwarded_chain(request, trusted) == chain
        assert client_ip(request, trusted) == chain[0]


async def test_I5_trace_never_reaches_the_upstream(upstream: ServedUpstream) -> None:
    """An upstream that answers TRACE echoes the request it received: the application's
    configured credentials (`headers` in APPS_FILE) would come back to any client."""
    settings = app_settings(upstream.base, headers={"Authorization": "Bearer server-secret"})
    async with run_gateway(settings) as gw:
        resp = await raw_request(gw.url, f"{AGENT}/x", method="TRACE", headers={"X-CSRF": "1"})
    assert resp.status == 405
    assert b'"method_not_allowed"' in resp.body and b"server-secret" not in resp.body
    assert upstream.fake.seen == []


# -- I2: redirects stay inside the application -------------------------------------------------

# (Location, whether a browser following it would stay in app `shop` or leave this host).
REDIRECTS_KEPT = [
    "jobs/1",
    "./jobs/1",
    "?page=2",
    "/apps/shop/agent/jobs/1",
    "/apps/shop/session",
    "https://idp.example/authorize?client_id=x",
    "//other.example/x",
]
REDIRECTS_REFUSED = [
    "/apps/other/agent/chat",
    "../../other/agent/chat",
    "/apps/shop/../other/agent/chat",
    "/apps/shop/agent/../../other/session",
    "/apps/shop/%2e%2e/other/agent/chat",
    "/apps/shop/%2E%2E%2Fother/agent",
    "/apps/shop/..\\other/agent/chat",
    "\\\\other.example/x",
    "/apps/shop/.\t./other/agent",
    "/metrics",
    "/",
    "/apps/shop",
    "http://127.0.0.1/apps/other/agent/chat",
    "https://127.0.0.1:1/apps/other/session",
    "HTTP://127.0.0.1./apps/other/session",
    "http:/apps/other/agent/chat",
    "http://0x7f.1/apps/other/agent/chat",
    "http://2130706433/apps/other/agent/chat",
    "http://0177.0.0.1/apps/other/agent/chat",
    "http://127.1/apps/other/agent/chat",
    "http://%31%32%37.0.0.1/apps/other/agent/chat",
]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("location", REDIRECTS_REFUSED)
async def test_I2_a_redirect_to_another_part_of_this_host_is_refused(
    upstream: ServedUpstream, gw: RunningGateway, status: int, location: str
) -> None:
    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": location})

    upstream.fake.on("/v1/go", redirect)
    resp = await raw_request(gw.url, f"{AGENT}/go")
    assert resp.status == 502, (status, location)
    assert b'"upstream_redirect_not_allowed"' in resp.body
    assert "Location" not in resp.headers


@pytest.mark.parametrize("location", REDIRECTS_KEPT)
async def test_I2_a_redirect_inside_the_application_or_to_another_host_is_relayed(
    upstream: ServedUpstream, gw: RunningGateway, location: str
) -> None:
    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": location})

    upstream.fake.on("/v1/go", redirect)
    resp = await raw_request(gw.url, f"{AGENT}/go")
    assert resp.status == 307
    assert resp.headers.getall("Location") == [location]


async def test_I2_two_locations_or_a_location_on_a_non_redirect(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async def two(request: web.Request) -> web.Response:
        response = web.Response(status=302)
        response.headers.add("Location", "/apps/shop/agent/a")
        response.headers.add("Location", "/apps/other/agent/b")
        return response

    async def created(request: web.Request) -> web.Response:
        # Not followed by a browser: informational, relayed as sent.
        return web.Response(status=201, headers={"Location": "/apps/other/agent/x"})

    upstream.fake.on("/v1/two", two)
    upstream.fake.on("/v1/created", created)
    resp = await raw_request(gw.url, f"{AGENT}/two")
    assert resp.status == 502
    resp = await raw_request(gw.url, f"{AGENT}/created")
    assert resp.status == 201 and resp.headers["Location"] == "/apps/other/agent/x"
