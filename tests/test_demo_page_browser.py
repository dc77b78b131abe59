"""The demo page in a real headless Chromium against a real `python -m app`: a person types a
message and the built-in demo agent's reply streams in through the gateway, token by token.

Chromium is Debian's (`/usr/bin/chromium`, installed by `scripts/system-deps`), driven by the
`playwright` package; `playwright install` is never needed (see ../shared/TOOLING.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page

from app.demo_agent import compose_reply
from tests.conftest import GatewayProcessFactory

pytestmark = pytest.mark.browser

LAST_REPLY = "#transcript .msg.agent:last-of-type"


async def send(page: Page, message: str) -> None:
    await page.fill("#message", message)
    await page.click("#send")


async def finished_reply(page: Page) -> str:
    await page.wait_for_function(
        f"() => document.querySelector('{LAST_REPLY}')?.dataset.state === 'done'", timeout=20_000
    )
    text = await page.text_content(LAST_REPLY)
    assert text is not None
    return text


async def test_a_person_chats_with_the_demo_agent_through_the_gateway(
    browser: Browser, gateway_process: GatewayProcessFactory
) -> None:
    # Slow enough that a human (and this test) sees the reply grow token by token.
    proc = gateway_process({"DEMO_TOKEN_DELAY_SECONDS": "0.05"})
    page = await browser.new_page()
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            problems.append(message.text)  # CSP violations are reported here

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(str(error)))
    response = await page.goto(proc.url + "/")
    assert response is not None and response.ok

    message = "Hello from a real browser"
    expected = compose_reply(message, 1)
    await send(page, message)
    # Incremental: some tokens are on screen while the stream is still open.
    await page.wait_for_function(
        f"""() => {{
            const reply = document.querySelector('{LAST_REPLY}');
            return reply && reply.dataset.state === 'streaming'
                && Number(reply.dataset.tokens) >= 2;
        }}""",
        timeout=20_000,
        polling="raf",
    )
    partial = await page.text_content(LAST_REPLY)
    assert partial is not None
    assert partial and expected.startswith(partial) and partial != expected, partial
    assert await finished_reply(page) == expected
    tokens = await page.get_attribute(LAST_REPLY, "data-tokens")
    assert tokens is not None and int(tokens) > 10

    # The session cookie is HttpOnly: the page's script cannot see it.
    assert "agent_sid" not in await page.evaluate("document.cookie")
    cookies = await page.context.cookies()
    assert [c["name"] for c in cookies] == ["agent_sid"]
    assert cookies[0]["httpOnly"] and cookies[0]["path"] == "/apps/demo"

    # The gateway binds the conversation to the session: the agent counts the turns.
    await send(page, "second message")
    assert await finished_reply(page) == compose_reply("second message", 2)

    # "New conversation" logs out of `demo` (DELETE session): the next turn is 1 again.
    await page.click("#reset")
    await page.wait_for_function("() => document.querySelectorAll('#transcript li').length === 0")
    await send(page, "fresh start")
    assert await finished_reply(page) == compose_reply("fresh start", 1)

    assert problems == []
    await page.close()


async def test_the_page_shows_gateway_errors(
    browser: Browser, gateway_process: GatewayProcessFactory
) -> None:
    proc = gateway_process()
    page = await browser.new_page()
    await page.goto(proc.url + "/")
    # A request that lost its CSRF header on the way: the page shows the gateway's error.
    await page.route(
        "**/apps/demo/agent/chat",
        lambda route: route.continue_(headers={**route.request.headers, "x-csrf": "0"}),
    )
    await send(page, "forged without the CSRF header")
    error = page.locator("#transcript .msg.error")
    await error.wait_for(timeout=20_000)
    assert "csrf_header_missing" in (await error.text_content() or "")
    await page.close()


# -- small screens ---------------------------------------------------------------------------

NO_OVERFLOW = (
    "() => ({scroll: document.documentElement.scrollWidth,"
    " client: document.documentElement.clientWidth})"
)


@pytest.mark.parametrize("width", [360, 320])
async def test_the_page_fits_a_phone_and_new_conversation_stays_visible(
    browser: Browser, gateway_process: GatewayProcessFactory, tmp_path: Path, width: int
) -> None:
    """Before: at 320-390 px the composer overflowed and "New conversation" was cut off."""
    proc = gateway_process()
    page = await browser.new_page(viewport={"width": width, "height": 640})
    await page.goto(proc.url + "/")
    await send(page, "a message long enough to wrap over several lines on a small phone screen")
    await finished_reply(page)
    sizes = await page.evaluate(NO_OVERFLOW)
    shot = tmp_path / f"demo-page-{width}px.png"
    await page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert sizes["scroll"] <= sizes["client"] == width, sizes
    for selector in ("#reset", "#send", "#message"):
        box = await page.locator(selector).bounding_box()
        assert box is not None, selector
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, (selector, box)
    assert await page.locator("#reset").is_visible()
    # And it still works: the button is clickable where it is drawn.
    await page.click("#reset")
    await page.wait_for_function("() => document.querySelectorAll('#transcript li').length === 0")
    await page.close()


async def test_the_page_talks_to_the_configured_builtin_application(
    browser: Browser, gateway_process: GatewayProcessFactory, tmp_path: Path
) -> None:
    """With APPS_FILE, `/` uses the application on `builtin:demo`, whatever its id."""
    apps = tmp_path / "apps.toml"
    apps.write_text('[apps.helpdesk]\nupstream = "builtin:demo"\n')
    proc = gateway_process({"APPS_FILE": str(apps)})
    page = await browser.new_page()
    await page.goto(proc.url + "/")
    assert await page.text_content("#agent-url") == "POST /apps/helpdesk/agent/chat"
    await send(page, "hello helpdesk")
    assert await finished_reply(page) == compose_reply("hello helpdesk", 1)
    cookies = await page.context.cookies()
    assert [c["path"] for c in cookies] == ["/apps/helpdesk"]
    await page.close()
