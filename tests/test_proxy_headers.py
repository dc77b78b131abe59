"""Header hygiene, asserted on what the upstream actually received and what the browser got."""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

from app.proxy.headers import THREAD_HEADER
from tests.conftest import make_settings
from tests.fake_upstream import (
    RunningGateway,
    ServedUpstream,
    app_settings,
    raw_request,
    run_gateway,
)

AGENT = "/apps/shop/agent"


# Everything a hostile or confused browser (or a proxy it controls) might send.
HOSTILE_REQUEST_HEADERS = [
    ("Connection", "close, X-Secret-Hop"),
    ("X-Secret-Hop", "only-for-the-next-hop"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Proxy-Connection", "keep-alive"),
    ("Proxy-Authorization", "Basic cHJveHk6cHc="),
    ("Cookie", "agent_sid=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA; tracking=1"),
    ("Authorization", "Bearer browser-token"),
    ("Forwarded", "for=198.51.100.7;proto=https;host=evil.example"),
    ("X-Forwarded-For", "198.51.100.7"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X-Real-IP", "198.51.100.7"),
    ("X-Agent-Thread-Id", "browser-chosen-thread"),
    ("X-Application-Id", "another-app"),
    ("Accept", "text/event-stream"),
    ("Last-Event-ID", "42"),
    ("Accept-Language", "fr-CH"),
    ("User-Agent", "test-browser/1.0"),
    ("X-Custom", "not on the allowlist"),
]


async def test_request_header_hygiene_for_an_untrusted_peer(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    resp = await raw_request(gw.url, f"{AGENT}/chat", headers=HOSTILE_REQUEST_HEADERS)
    assert resp.status == 200
    seen = upstream.fake.last.headers
    for dropped in (
        "Connection",  # (aiohttp's client adds none of its own on HTTP/1.1 keep-alive)
        "X-Secret-Hop",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Proxy-Connection",
        "Proxy-Authorization",
        "Cookie",
        "Authorization",
        "Forwarded",
        "X-Forwarded-Prefix",
        "X-Custom",  # not on the allowlist (and the application adds nothing to it)
    ):
        assert dropped not in seen, f"{dropped} reached the upstream"
    # Re-authored by the gateway, from the TCP peer, not from the request.
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Real-IP") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == [f"127.0.0.1:{gw.port}"]
    # The gateway's own headers, never the browser's copies.
    assert seen.getall("X-Application-Id") == ["shop"]
    assert seen.getall(THREAD_HEADER) != ["browser-chosen-thread"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", seen[THREAD_HEADER])
    assert seen.getall("X-Request-Id") == [resp.headers["X-Request-Id"]]
    assert seen["Host"] == f"{upstream.base.host}:{upstream.base.port}"
    # Forwarded as sent.
    assert seen["Accept"] == "text/event-stream"
    assert seen["Last-Event-ID"] == "42"
    assert seen["Accept-Language"] == "fr-CH"
    assert seen["User-Agent"] == "test-browser/1.0"
    # Event streams are never compressed: the gateway asks for identity.
    assert seen["Accept-Encoding"] == "identity"


async def test_the_gateway_invents_no_request_headers(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    resp = await raw_request(
        gw.url, f"{AGENT}/echo", method="POST", body=b"{}", headers={"X-CSRF": "1"}
    )
    assert resp.status == 200
    seen = upstream.fake.last.headers
    for absent in ("Accept", "Accept-Encoding", "User-Agent", "Content-Type"):
        assert absent not in seen, f"aiohttp's default {absent} leaked upstream"
    assert seen["Content-Length"] == "2"
    assert upstream.fake.last.body == b"{}"


async def test_a_trusted_proxy_is_believed_and_its_other_headers_dropped(
    upstream: ServedUpstream,
) -> None:
    """From a peer in `TRUSTED_PROXIES` the client address, scheme and host are believed; the
    gateway sends them as its own headers and drops the rest (issue 12, row 5: nginx passes
    whatever the browser wrote in `X-Forwarded-Prefix`, `Forwarded`, `X-Real-IP`)."""
    settings = app_settings(upstream.base, {"TRUSTED_PROXIES": "127.0.0.0/8"})
    async with run_gateway(settings) as gw:
        resp = await raw_request(
            gw.url,
            f"{AGENT}/chat",
            headers=[
                ("X-Forwarded-For", "203.0.113.9, 10.1.2.3"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "shop.example.com"),
                ("X-Forwarded-Prefix", "/shop"),
                ("Forwarded", "for=203.0.113.9;proto=https"),
                ("X-Real-IP", "203.0.113.9"),
            ],
        )
    assert resp.status == 200
    seen = upstream.fake.last.headers
    # 10.1.2.3 is not a trusted proxy: it is the client, whatever it wrote left of itself.
    assert seen.getall("X-Forwarded-For") == ["10.1.2.3, 127.0.0.1"]
    assert seen.getall("X-Real-IP") == ["10.1.2.3"]
    assert seen.getall("X-Forwarded-Proto") == ["https"]
    assert seen.getall("X-Forwarded-Host") == ["shop.example.com"]
    assert "X-Forwarded-Prefix" not in seen
    assert "Forwarded" not in seen


async def test_configured_headers_win_over_the_browsers(upstream: ServedUpstream) -> None:
    settings = app_settings(
        upstream.base,
        headers={"Authorization": "Bearer server-secret", "X-Api-Key": "server-key"},
        forward_authorization=True,
    )
    async with run_gateway(settings) as gw:
        resp = await raw_request(
            gw.url,
            f"{AGENT}/chat",
            headers=[
                ("Authorization", "Bearer browser"),
                ("x-api-key", "browser-key"),
                ("X-API-KEY", "browser-key-2"),
            ],
        )
    assert resp.status == 200
    seen = upstream.fake.last.headers
    assert seen.getall("Authorization") == ["Bearer server-secret"]
    assert seen.getall("X-Api-Key") == ["server-key"]


async def test_forward_authorization_passes_the_browsers_credentials(
    upstream: ServedUpstream,
) -> None:
    async with run_gateway(app_settings(upstream.base, forward_authorization=True)) as gw:
        resp = await raw_request(
            gw.url, f"{AGENT}/chat", headers={"Authorization": "Bearer user-token"}
        )
    assert resp.status == 200
    assert upstream.fake.last.headers.getall("Authorization") == ["Bearer user-token"]


async def test_forward_request_headers_extends_the_allowlist_by_name_and_prefix(
    upstream: ServedUpstream, tmp_path: Path
) -> None:
    """An agent API that needs headers of its own gets them when APPS_FILE lists them; the
    floor (forwarding, client-address, identity headers) still holds."""
    apps_file = tmp_path / "apps.toml"
    apps_file.write_text(
        f"""
[apps.shop]
upstream = "{upstream.base}"
forward_request_headers = ["Anthropic-Beta", "X-Stainless-*"]
"""
    )
    async with run_gateway(make_settings(APPS_FILE=str(apps_file))) as gw:
        resp = await raw_request(
            gw.url,
            f"{AGENT}/chat",
            headers=[
                ("anthropic-beta", "tools-1"),
                ("X-Stainless-Lang", "js"),
                ("X-Stainless-Retry-Count", "0"),
                ("X-Stainless-Forwarded-For", "198.51.100.7"),  # the floor wins over a prefix
                ("X-Other", "not listed"),
                ("Accept", "application/json"),
            ],
        )
    assert resp.status == 200
    seen = upstream.fake.last.headers
    assert seen.getall("Anthropic-Beta") == ["tools-1"]
    assert seen.getall("X-Stainless-Lang") == ["js"]
    assert seen.getall("X-Stainless-Retry-Count") == ["0"]
    assert seen.getall("Accept") == ["application/json"]
    assert "X-Stainless-Forwarded-For" not in seen and "X-Other" not in seen


async def test_apps_file_credentials_reach_the_upstream_and_never_the_browser(
    upstream: ServedUpstream, tmp_path: Path
) -> None:
    apps_file = tmp_path / "apps.toml"
    apps_file.write_text(
        f"""
[apps.shop]
upstream = "{upstream.base}"
headers = {{ Authorization = "Bearer ${{SHOP_AGENT_TOKEN}}" }}
"""
    )
    settings = make_settings(APPS_FILE=str(apps_file), SHOP_AGENT_TOKEN="s3cret-token")
    async with run_gateway(settings) as gw:
        resp = await raw_request(
            gw.url, f"{AGENT}/whoami", headers={"Authorization": "Bearer browser"}
        )
    assert resp.status == 200
    assert upstream.fake.last.headers.getall("Authorization") == ["Bearer s3cret-token"]
    assert b"s3cret" not in resp.body
    assert all("s3cret" not in v for v in resp.headers.values())


async def test_response_header_hygiene(upstream: ServedUpstream, gw: RunningGateway) -> None:
    async def leaky(request: web.Request) -> web.Response:
        response = web.json_response({"ok": True})
        response.headers.add("Set-Cookie", "upstream_session=abc; Path=/")
        response.headers.add("Set-Cookie", "other=def; Path=/; HttpOnly")
        response.headers["Connection"] = "keep-alive, X-Upstream-Hop"
        response.headers["X-Upstream-Hop"] = "internal"
        response.headers["Keep-Alive"] = "timeout=5"
        response.headers["Proxy-Authenticate"] = "Basic"
        response.headers["Trailer"] = "X-Checksum"
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Cache-Control"] = "private, max-age=5"
        response.headers["Vary"] = "Accept"
        response.headers["X-Upstream-Custom"] = "kept"
        return response

    upstream.fake.on("/v1/leaky", leaky)
    resp = await raw_request(gw.url, f"{AGENT}/leaky")
    assert resp.status == 200
    assert resp.body == b'{"ok": true}'
    cookies = resp.headers.getall("Set-Cookie", [])
    # The only cookie is the gateway's own session cookie (minted by this first agent call).
    assert len(cookies) == 1 and cookies[0].startswith("agent_sid="), cookies
    for dropped in (
        "X-Upstream-Hop",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Trailer",
        "Access-Control-Allow-Origin",
        "Access-Control-Allow-Credentials",
    ):
        assert dropped not in resp.headers, f"{dropped} reached the browser"
    assert resp.headers["Connection"] == "close"  # ours (the request asked for close)
    assert resp.headers["Cache-Control"] == "private, max-age=5"
    assert resp.headers["Vary"] == "Accept"
    # Relayed only when the application lists it (`relay_response_headers`, docs/security.md).
    assert "X-Upstream-Custom" not in resp.headers
    assert resp.headers["X-Request-Id"] == upstream.fake.last.headers["X-Request-Id"]
