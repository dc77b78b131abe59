"""Security headers on the gateway's own responses: `X-Content-Type-Options: nosniff` and
`Referrer-Policy` everywhere (errors and streams included), `Cache-Control: no-store` on every
session endpoint, and a strict Content-Security-Policy on the demo page, enforced by a real
browser.
"""

from __future__ import annotations

import pytest
from aiohttp import ClientResponse
from playwright.async_api import Browser

from app.demo_agent import DEMO_PAGE_CSP
from app.proxy.headers import PROXIED_CSP
from tests.conftest import CSRF, Gateway, GatewayFactory, GatewayProcessFactory
from tests.test_sessions_http import patch


def assert_security_headers(resp: ClientResponse, what: str) -> None:
    """`nosniff`, no referrer, and the sandbox policy (the demo page has its own)."""
    assert resp.headers.get("X-Content-Type-Options") == "nosniff", what
    assert resp.headers.get("Referrer-Policy") == "no-referrer", what
    page = resp.url.path == "/" and resp.status == 200
    assert resp.headers.get("Content-Security-Policy") == (
        DEMO_PAGE_CSP if page else PROXIED_CSP
    ), what


async def test_every_own_response_carries_the_security_headers(gateway: Gateway) -> None:
    client = gateway.client
    await patch(client, {"a": 1})
    requests: list[tuple[str, str, dict[str, str]]] = [
        ("GET", "/healthz", {}),
        ("GET", "/readyz", {}),
        ("GET", "/metrics", {}),
        ("GET", "/", {}),
        ("GET", "/static/app.js", {}),
        ("GET", "/apps/demo/session", {}),
        ("GET", "/apps/demo/session?slide=0", {}),
        ("PATCH", "/apps/demo/session", CSRF),
        ("POST", "/apps/demo/session/rotate", CSRF),
        ("POST", "/apps/demo/agent/chat", CSRF),  # a stream from the built-in demo agent
        ("DELETE", "/apps/demo/session", CSRF),
        ("PATCH", "/apps/demo/session", {}),  # 403 csrf
        ("GET", "/apps/Bad!/session", {}),  # 400
        ("GET", "/apps/nope/session", {}),  # 404
        ("GET", "/no/such/route", {}),  # 404
        ("PUT", "/apps/demo/session", CSRF),  # 405
        ("GET", "/apps/demo/session?slide=9", {}),  # 400
    ]
    for method, path, headers in requests:
        body = {"message": "hi"} if path.endswith("/chat") else {"b": 2}
        resp = await client.request(method, path, json=body, headers=headers)
        await resp.read()
        assert_security_headers(resp, f"{method} {path} -> {resp.status}")


async def test_refusals_before_any_handler_carry_the_sandbox_policy(
    gateway_factory: GatewayFactory,
) -> None:
    """The middleware's own refusals on `/apps/` (host, application, origin, CSRF) are JSON
    that must be as inert as a relayed answer if a browser opens one as a page."""
    gateway = await gateway_factory("memory", ALLOWED_HOSTS="gateway.example")
    client = gateway.client
    host = {"Host": "gateway.example"}
    requests: list[tuple[str, str, dict[str, str], int]] = [
        ("GET", "/apps/demo/session", {"Host": "evil.example"}, 421),
        ("GET", "/apps/nope/agent/x", host, 404),
        ("GET", "/apps/Bad!/agent/x", host, 400),
        ("GET", "/apps/demo/agent/x", {**host, "Origin": "https://evil.example"}, 403),
        ("POST", "/apps/demo/agent/x", host, 403),
        ("POST", "/apps/demo/session/rotate", {**host, "Origin": "https://evil.example"}, 403),
    ]
    for method, path, headers, status in requests:
        resp = await client.request(method, path, headers=headers)
        await resp.read()
        what = f"{method} {path} {headers} -> {resp.status}"
        assert resp.status == status, what
        assert resp.content_type == "application/json", what
        assert_security_headers(resp, what)


async def test_session_endpoints_are_never_cached(gateway: Gateway) -> None:
    client = gateway.client
    responses = [
        await client.get("/apps/demo/session"),
        await client.get("/apps/demo/session?slide=0"),
        await patch(client, {"a": 1}),
        await client.post("/apps/demo/session/rotate", headers=CSRF),
        await client.delete("/apps/demo/session", headers=CSRF),
        await client.patch("/apps/demo/session", json={"a": 1}),  # 403
        await client.post("/apps/demo/session/rotate"),  # 403
        await client.patch("/apps/demo/session", data=b"[]", headers=CSRF),  # 400
        await client.get("/apps/demo/session?slide=x"),  # 400
    ]
    for resp in responses:
        assert resp.headers.get("Cache-Control") == "no-store", (resp.method, resp.url, resp.status)


def test_the_demo_page_policy_is_strict() -> None:
    directives = {
        part.split()[0]: part.split()[1:] for part in DEMO_PAGE_CSP.split(";") if part.strip()
    }
    assert directives["default-src"] == ["'self'"]
    assert directives["script-src"] == ["'self'"]
    assert directives["style-src"] == ["'self'"]
    assert directives["connect-src"] == ["'self'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert directives["base-uri"] == ["'none'"]
    flat = " ".join(v for values in directives.values() for v in values)
    for loose in ("'unsafe-inline'", "'unsafe-eval'", "*", "data:", "http:", "https:"):
        assert loose not in flat.split(), loose


async def test_the_demo_page_headers(memory_gateway: Gateway) -> None:
    resp = await memory_gateway.client.get("/")
    assert resp.status == 200
    assert resp.headers["Content-Security-Policy"] == DEMO_PAGE_CSP
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert_security_headers(resp, "GET /")


@pytest.mark.browser
async def test_the_browser_enforces_the_demo_page_policy(
    browser: Browser, gateway_process: GatewayProcessFactory
) -> None:
    """An injected inline script (what an XSS would add) does not run; a script from
    another origin is not loaded (the page's own script runs: tests/test_demo_page_browser.py)."""
    proc = gateway_process()
    page = await browser.new_page()
    response = await page.goto(proc.url + "/")
    assert response is not None and response.status == 200
    await page.wait_for_function("() => document.querySelector('#status') !== null")
    async with page.expect_console_message(
        lambda message: "Content Security Policy" in message.text, timeout=10_000
    ) as violation:
        await page.evaluate(
            """() => {
                const inline = document.createElement('script');
                inline.textContent = 'window.__injected = true';
                document.head.appendChild(inline);
                const foreign = document.createElement('script');
                foreign.src = 'http://127.0.0.2:9/evil.js';
                document.head.appendChild(foreign);
            }"""
        )
    assert "script-src" in (await violation.value).text
    assert await page.evaluate("() => window.__injected === undefined")
    await page.close()
