"""Issue 12, rows 4 and 5 (docs/reliability.md I4, I5) through the shipped deploy/nginx.conf:
a real nginx (rendered for loopback as `scripts/cluster` renders it) in front of the gateway,
the browser connecting from 127.0.0.2 so that `TRUSTED_PROXIES=127.0.0.1/32` trusts nginx only.

- I4: an upstream answering `101 Switching Protocols` must not turn the browser's connection
  through nginx into a raw tunnel to the gateway (through which `/metrics`, which nginx does not
  publish, and requests with forwarding headers of the browser's choosing would arrive from
  nginx's trusted address).
- I5: the forwarding headers a browser writes reach neither the gateway (nginx clears or
  overwrites them, and drops names with underscores) nor, in any case, the upstream.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tests.fake_upstream import ServedUpstream, app_settings, run_gateway
from tests.nginx_front import BROWSER_ADDRESS, connect_from, nginx_in_front, read_response
from tests.test_proxy_isolation import HOSTILE_FORWARDING, raw_upstream

pytestmark = pytest.mark.system  # a real nginx in front of the gateway

TRUST_NGINX = {"TRUSTED_PROXIES": "127.0.0.1/32"}


def request_head(method: str, target: str, port: int, *headers: tuple[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def test_I4_a_101_from_an_upstream_never_makes_nginx_a_tunnel(tmp_path: Path) -> None:
    upgrade = (b"HTTP/1.1 101 Switching Protocols", b"Connection: Upgrade\r\nUpgrade: tunnel\r\n")
    async with (
        raw_upstream(*upgrade) as base,
        run_gateway(app_settings(base, TRUST_NGINX)) as gw,
        nginx_in_front(tmp_path / "nginx", gw.port) as port,
    ):
        # Straight through nginx, /metrics is not published.
        reader, writer = await connect_from(port)
        try:
            writer.write(request_head("GET", "/metrics", port))
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 404"), head
            assert b"agent_bff_" not in body

            # The upgrade attempt on an agent path: the upstream says 101.
            writer.write(
                request_head(
                    "GET",
                    "/apps/shop/agent/upgrade",
                    port,
                    ("Upgrade", "tunnel"),
                    ("Connection", "Upgrade"),
                )
            )
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 502"), head
            assert b'"upstream_protocol_error"' in body

            # The same connection still speaks HTTP to nginx, which still hides /metrics (a
            # tunnel would carry this request to the gateway, from nginx's trusted address).
            writer.write(
                request_head(
                    "GET",
                    "/metrics",
                    port,
                    ("X-Forwarded-For", "6.6.6.6"),
                    ("Connection", "close"),
                )
            )
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 404"), head
            assert b"agent_bff_" not in body
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_I5_nginx_passes_no_forwarding_header_of_the_browsers(
    tmp_path: Path, upstream: ServedUpstream
) -> None:
    """nginx alone, a recording server in the gateway's place: what deploy/nginx.conf sends."""
    async with nginx_in_front(tmp_path / "nginx", upstream.server.port or 0) as port:
        reader, writer = await connect_from(port)
        try:
            writer.write(
                request_head(
                    "GET",
                    "/apps/shop/agent/chat",
                    port,
                    *HOSTILE_FORWARDING,
                    ("Connection", "close"),
                )
            )
            head, _ = await read_response(reader)
        finally:
            writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    seen = upstream.fake.last.headers
    passed = {name.lower() for name in seen}
    # nginx's own, from the connection: the browser's copies overwritten or appended to.
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == [f"127.0.0.1:{port}"]
    assert seen.getall("X-Forwarded-For") == [f"198.51.100.7, {BROWSER_ADDRESS}"]
    cleared = {name.lower() for name, _ in HOSTILE_FORWARDING} - {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    }
    # What nginx cannot clear by name (no prefix rule) is left to the gateway; what it must
    # clear itself: the common client-address, scheme and URL headers, and every name with a
    # character other than a letter, a digit or `-` (`_`, `.`, `~`: invalid to nginx).
    must_clear = {
        "forwarded",
        "x-real-ip",
        "x-forwarded-port",
        "x-forwarded-ssl",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-forwarded-scheme",
        "x-forwarded-uri",
        "true-client-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-host",
        "x-http-method-override",
        "proxy",
        "x-forwarded",
        "forwarded-for",
        "x-forward-for",
        "proxy-client-ip",
        "wl-proxy-client-ip",
        "fly-client-ip",
        "x-azure-clientip",
        "x-appengine-user-ip",
        "via",
    } | {name for name in cleared if not name.replace("-", "").isalnum()}
    assert must_clear <= cleared
    assert not must_clear & passed, sorted(must_clear & passed)


async def test_I5_through_nginx_the_upstream_gets_only_the_gateways_forwarding_headers(
    tmp_path: Path, upstream: ServedUpstream
) -> None:
    async with (
        run_gateway(app_settings(upstream.base, TRUST_NGINX)) as gw,
        nginx_in_front(tmp_path / "nginx", gw.port) as port,
    ):
        reader, writer = await connect_from(port)
        try:
            writer.write(
                request_head(
                    "GET",
                    "/apps/shop/agent/chat",
                    port,
                    *HOSTILE_FORWARDING,
                    ("Connection", "close"),
                )
            )
            head, _ = await read_response(reader)
        finally:
            writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    seen = upstream.fake.last.headers
    hostile = {name.lower() for name, _ in HOSTILE_FORWARDING}
    reached = {name.lower() for name in seen} & hostile
    assert reached == {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"}
    # Believed: the browser's address (nginx's word), not what the browser wrote.
    assert seen.getall("X-Forwarded-For") == [f"{BROWSER_ADDRESS}, 127.0.0.1"]
    assert seen.getall("X-Real-IP") == [BROWSER_ADDRESS]
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == [f"127.0.0.1:{port}"]
    assert "198.51.100.7" not in ",".join(seen.values())
