"""Resumable runs in a real headless Chromium: the demo page (application `demo`, resumable by
default) reads its answer with `EventSource`; a forced connection drop (every TCP connection
between the browser and the gateway reset mid-answer) and a page reload mid-answer both end
with the whole answer on screen, no token lost or doubled."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page

from app.demo_agent import compose_reply, tokenize
from tests.conftest import GatewayProcessFactory
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.browser

LAST_REPLY = "#transcript .msg.agent:last-of-type"


@pytest.fixture
async def proxied(gateway_process: GatewayProcessFactory) -> AsyncIterator[FaultProxy]:
    """`python -m app` (default registry: `demo` resumable) behind a TCP proxy we can cut."""
    proc = gateway_process({"DEMO_TOKEN_DELAY_SECONDS": "0.08"})
    async with FaultProxy(proc.port) as proxy:
        yield proxy


async def _tokens_on_screen(page: Page, at_least: int) -> None:
    await page.wait_for_function(
        f"""() => {{
            const reply = document.querySelector('{LAST_REPLY}');
            return reply && reply.dataset.state === 'streaming'
                && Number(reply.dataset.tokens) >= {at_least};
        }}""",
        timeout=20_000,
        polling="raf",
    )


async def _finished(page: Page) -> tuple[str, int]:
    await page.wait_for_function(
        f"() => ['done', 'failed'].includes(document.querySelector('{LAST_REPLY}')?.dataset.state)",
        timeout=30_000,
    )
    assert await page.get_attribute(LAST_REPLY, "data-state") == "done"
    text = await page.text_content(LAST_REPLY)
    tokens = await page.get_attribute(LAST_REPLY, "data-tokens")
    assert text is not None and tokens is not None
    return text, int(tokens)


async def test_event_source_survives_a_forced_connection_drop(
    browser: Browser, proxied: FaultProxy
) -> None:
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(proxied.url + "/")
    message = "survive a dropped connection"
    await page.fill("#message", message)
    await page.click("#send")
    await _tokens_on_screen(page, 3)
    assert proxied.reset_all() >= 1  # every browser connection: RST mid-answer
    text, tokens = await _finished(page)
    expected = compose_reply(message, 1)
    assert text == expected
    assert tokens == len(tokenize(expected))  # none lost, none doubled
    reconnects = await page.get_attribute(LAST_REPLY, "data-reconnects")
    assert reconnects is not None and int(reconnects) >= 1
    assert errors == []


async def test_the_answer_survives_a_reload_mid_stream(
    browser: Browser, proxied: FaultProxy
) -> None:
    page = await browser.new_page()
    await page.goto(proxied.url + "/")
    message = "reload me"
    await page.fill("#message", message)
    await page.click("#send")
    await _tokens_on_screen(page, 3)
    await page.reload()
    await page.wait_for_selector(
        f"{LAST_REPLY}[data-resumed='1']", state="attached", timeout=10_000
    )
    text, tokens = await _finished(page)
    expected = compose_reply(message, 1)
    assert text == expected
    assert tokens == len(tokenize(expected))
    # Done: nothing pending any more, a further reload shows no resumed answer.
    await page.reload()
    await page.wait_for_timeout(300)
    assert await page.locator("#transcript .msg").count() == 0
