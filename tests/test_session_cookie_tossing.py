"""Cookie tossing (issue 12 row 3): a cookie planted under the session cookie's name, with a
path or domain that also matches `/apps/{id}`, never makes the victim read or write the
attacker's session.

The rule (`app.sessions.cookies.choose_session_id`): the one distinct well-formed value under
our name is the session id; two or more distinct ones are no session (logged once per request,
without values). Unit tests on raw headers as browsers send them, the same through the HTTP
surface, and headless Chromium planting the cookie the two ways an attacker can: script on
another path of the origin (`document.cookie`, `Path=/` or a longer path), and a sibling
subdomain's `Domain=` cookie.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext

from app.sessions.cookies import AMBIGUOUS, choose_session_id, cookie_values
from app.sessions.ids import new_session_id
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, CSRF, GatewayFactory, GatewayProcessFactory

OURS = new_session_id()
PLANTED = new_session_id()


# -- the rule, on raw headers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([f"agent_sid={OURS}"], OURS),
        ([f"theme=dark; agent_sid={OURS}; _ga=1"], OURS),
        # Browsers send longer paths first: ours (/apps/demo) before a planted Path=/ ...
        ([f"agent_sid={OURS}; agent_sid={PLANTED}"], AMBIGUOUS),
        # ... and a planted longer path (/apps/demo/agent) before ours: order proves nothing.
        ([f"agent_sid={PLANTED}; agent_sid={OURS}"], AMBIGUOUS),
        ([f"agent_sid={OURS}", f"agent_sid={PLANTED}"], AMBIGUOUS),  # split over two headers
        ([f'agent_sid="{OURS}"; x="a;b"; agent_sid={PLANTED}'], AMBIGUOUS),  # quotes: no meaning
        ([f'x="a; agent_sid={OURS}; b=c"; agent_sid={PLANTED}'], AMBIGUOUS),  # a browser's split
        # The same value twice (a stale duplicate of our own cookie) is one id.
        ([f"agent_sid={OURS}; agent_sid={OURS}"], OURS),
        ([f'agent_sid="{OURS}"; agent_sid={OURS}'], OURS),
        ([f"agent_sid={OURS}", f"agent_sid={OURS}"], OURS),
        # A value that cannot be a session id names nothing: ignored, not counted.
        ([f"agent_sid=junk; agent_sid={OURS}"], OURS),
        ([f"agent_sid={OURS}; agent_sid="], OURS),
        ([f"agent_sid={OURS}x; agent_sid={OURS[:-1]}"], None),
        ([f"xagent_sid={PLANTED}; agent_sid={OURS}"], OURS),
        (["theme=dark"], None),
        ([""], None),
        ([], None),
    ],
    ids=lambda value: (
        {OURS: "ours", PLANTED: "planted"}.get(value) if isinstance(value, str) else None
    ),
)
def test_one_distinct_well_formed_value_wins_several_are_none(
    headers: list[str], expected: object
) -> None:
    assert choose_session_id(headers, "agent_sid") == expected


def test_cookie_values_keeps_every_repeat_in_order() -> None:
    assert cookie_values(f"a=1; agent_sid={OURS}; agent_sid={PLANTED}", "agent_sid") == [
        OURS,
        PLANTED,
    ]
    # A quoted value does not span ";" (browsers give quotes no meaning).
    header = f'agent_sid={OURS}; b="x;y"; agent_sid={PLANTED}'
    assert cookie_values(header, "agent_sid") == [OURS, PLANTED]
    header = f'agent_sid="{OURS}"; b="x; agent_sid={PLANTED}"'
    assert cookie_values(header, "agent_sid") == [OURS, PLANTED + '"']


def test_a_quoted_value_cannot_hide_our_cookie_from_the_choice() -> None:
    """Cookie smuggling: planted `a="x` before ours and `b=y"` after it would make a
    quote-honouring parser (aiohttp's) read ours as part of `a`'s quoted value, while a planted
    `agent_sid` stayed visible."""
    header = f'agent_sid={PLANTED}; a="x; agent_sid={OURS}; b=y"'
    assert choose_session_id([header], "agent_sid") is AMBIGUOUS
    header = f'a="x; agent_sid={OURS}; b=y"; agent_sid={PLANTED}'
    assert choose_session_id([header], "agent_sid") is AMBIGUOUS


# -- through the HTTP surface ------------------------------------------------------------------


async def test_two_distinct_ids_read_and_write_neither_session(
    gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await gateway_factory("memory")
    sessions = {}
    for who in ("victim", "attacker"):
        resp = await gw.client.patch("/apps/demo/session", json={"who": who}, headers=CSRF)
        assert resp.status == 200
        sessions[who] = resp.cookies["agent_sid"].value
        gw.client.session.cookie_jar.clear()
    victim, attacker = sessions["victim"], sessions["attacker"]

    for header in (
        f"agent_sid={victim}; agent_sid={attacker}",
        f"agent_sid={attacker}; agent_sid={victim}",
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="app.sessions.storage_base"):
            resp = await gw.client.get("/apps/demo/session", headers={"Cookie": header})
            assert resp.status == 200 and await resp.json() == {"data": {}}
            resp = await gw.client.patch(
                "/apps/demo/session", json={"secret": 1}, headers={**CSRF, "Cookie": header}
            )
            assert resp.status == 200 and await resp.json() == {"data": {"secret": 1}}
            fresh = resp.cookies["agent_sid"]
            assert fresh.value not in (victim, attacker)  # a fresh, server-minted session
            assert fresh["path"] == "/apps/demo"
        gw.client.session.cookie_jar.clear()
        warnings = [r for r in caplog.records if "several distinct" in r.getMessage()]
        assert len(warnings) == 2, "one warning per request"
        for record in caplog.records:
            assert victim not in record.getMessage() and attacker not in record.getMessage()

    for sid, who in ((victim, "victim"), (attacker, "attacker")):
        resp = await gw.client.get("/apps/demo/session", headers={"Cookie": f"agent_sid={sid}"})
        assert await resp.json() == {"data": {"who": who}}, "neither session was read or written"


async def test_a_logout_with_two_ids_ends_both(gateway_factory: GatewayFactory) -> None:
    """Which one is the user's is unknown: both end (the user's must not outlive a logout;
    the other is the planter's own), and the cookie is expired."""
    gw = await gateway_factory("memory")
    sids = []
    for who in ("victim", "attacker"):
        resp = await gw.client.patch("/apps/demo/session", json={"who": who}, headers=CSRF)
        sids.append(resp.cookies["agent_sid"].value)
        gw.client.session.cookie_jar.clear()
    header = f"agent_sid={sids[0]}; agent_sid={sids[1]}"
    resp = await gw.client.delete("/apps/demo/session", headers={**CSRF, "Cookie": header})
    assert resp.status == 204
    assert (
        resp.cookies["agent_sid"].value == "" and resp.cookies["agent_sid"]["path"] == "/apps/demo"
    )
    assert await gw.raw.keys() == []


# -- in Chromium -------------------------------------------------------------------------------

HOST = "app.example.test"  # the gateway's site; "evil.example.test" is a sibling subdomain


@pytest.fixture
async def site_browser() -> AsyncIterator[Browser]:
    """Chromium resolving *.example.test to 127.0.0.1, so sibling subdomains exist."""
    from playwright.async_api import async_playwright

    args = [*CHROMIUM_ARGS, "--host-resolver-rules=MAP *.example.test 127.0.0.1"]
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield browser
        finally:
            await browser.close()


async def api(context: BrowserContext, base: str, method: str, body: Any = None) -> Any:
    """`fetch` of `/apps/demo/session` from a page of `base` (same origin, the browser's own
    cookies); returns the JSON body."""
    page = context.pages[0] if context.pages else await context.new_page()
    if not page.url.startswith(base):
        await page.goto(base + "/")
    result: Any = await page.evaluate(
        """async ([method, body]) => {
            const init = {method, headers: {"X-CSRF": "1", "Content-Type": "application/json"}};
            if (body !== null) init.body = JSON.stringify(body);
            const resp = await fetch("/apps/demo/session", init);
            return {status: resp.status, body: await resp.json()};
        }""",
        [method, body],
    )
    assert result["status"] == 200, result
    return result["body"]["data"]


async def session_cookie(context: BrowserContext) -> str:
    (cookie,) = [c for c in await context.cookies() if c["name"] == "agent_sid"]
    assert cookie["path"] == "/apps/demo" and cookie["httpOnly"]
    return cookie["value"]


async def sent_session_cookies(context: BrowserContext, url: str) -> int:
    """How many `agent_sid` cookies the browser would send to `url`, once a `document.cookie`
    write has reached the browser's cookie store (the renderer hands it over asynchronously, so
    reading the store at once can miss it); waits up to 5 s for two."""
    deadline = asyncio.get_running_loop().time() + 5.0
    while True:
        names = [c["name"] for c in await context.cookies(url)]
        count = names.count("agent_sid")
        if count >= 2 or asyncio.get_running_loop().time() > deadline:
            return count
        await asyncio.sleep(0.05)


@pytest.mark.browser
@pytest.mark.parametrize(
    "plant", ["script-path-root", "script-longer-path", "sibling-domain", "quote-smuggling"]
)
async def test_a_planted_cookie_never_reads_or_writes_the_attackers_session_in_chromium(
    site_browser: Browser, gateway_process: GatewayProcessFactory, plant: str
) -> None:
    proc = gateway_process()
    base = f"http://{HOST}:{proc.port}"
    attacker = await site_browser.new_context()
    assert await api(attacker, base, "PATCH", {"owner": "attacker"}) == {"owner": "attacker"}
    attacker_sid = await session_cookie(attacker)

    victim = await site_browser.new_context()
    assert await api(victim, base, "PATCH", {"owner": "victim"}) == {"owner": "victim"}
    if plant == "sibling-domain":
        # What evil.example.test's `Set-Cookie: agent_sid=...; Domain=example.test; Path=/` does.
        await victim.add_cookies(
            [{"name": "agent_sid", "value": attacker_sid, "domain": ".example.test", "path": "/"}]
        )
    elif plant == "quote-smuggling":
        # Sent as `agent_sid=ATTACKER; a="x; agent_sid=VICTIM; b=y"`: a parser that honours
        # quotes reads the victim's cookie as part of `a` and sees only the attacker's.
        page = victim.pages[0]
        for cookie in (f"agent_sid={attacker_sid}; path=/apps/demo/", 'a="x; path=/apps/demo/'):
            await page.evaluate(f"document.cookie = '{cookie}'")
        await page.evaluate("""document.cookie = 'b=y"; path=/'""")
    else:
        # A longer path (`/apps/demo/` matches `/apps/demo/session`) is sent before ours.
        path = "/" if plant == "script-path-root" else "/apps/demo/"
        page = victim.pages[0]
        await page.evaluate(f"document.cookie = 'agent_sid={attacker_sid}; path={path}'")
    assert await sent_session_cookies(victim, base + "/apps/demo/session") == 2, (
        "the browser sends both cookies"
    )

    seen = await api(victim, base, "GET")
    assert seen.get("owner") != "attacker", "the victim read the attacker's session"
    await api(victim, base, "PATCH", {"card": "4111"})
    # The attacker's session is untouched: nothing the victim wrote reached it.
    assert await api(attacker, base, "GET") == {"owner": "attacker"}
    await attacker.close()
    await victim.close()
