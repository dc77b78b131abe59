"""docs/frontend.md's JavaScript, run as written in a real Chromium against `python -m app`:
the session round trip, a streamed agent reply through the SSE reader, the CSRF header and the
HttpOnly cookie, and the error envelope when a call goes wrong."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import Browser

from app.demo_agent import compose_reply
from tests.conftest import GatewayProcessFactory, open_frontend_page
from tests.gateway_process import REPO_ROOT

pytestmark = pytest.mark.browser

DOC = REPO_ROOT / "docs" / "frontend.md"


def snippet_blocks() -> list[str]:
    blocks = re.findall(r"```js\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert len(blocks) == 2, "docs/frontend.md: the snippet, then its usage"
    return blocks


def as_function(*code: str, result: str) -> str:
    """`code` inside an async function (as a page script would run it) returning `result`."""
    return "async () => {\n" + "\n".join(code) + f"\nreturn {result};\n}}"


async def test_the_documented_snippet_works_against_the_gateway(
    browser: Browser, gateway_process: GatewayProcessFactory
) -> None:
    snippet, usage = snippet_blocks()
    proc = gateway_process({"DEMO_TOKEN_DELAY_SECONDS": "0.001"})
    page = await browser.new_page()
    # A page of the gateway's own origin, like a frontend served beside it.
    await open_frontend_page(page, str(proc.url))
    done = await page.evaluate(
        as_function(snippet, usage, result="{ data, reply, cookie: document.cookie }")
    )
    assert done["data"] == {"theme": "dark"}
    assert done["reply"] == compose_reply("hello", 1)
    assert done["cookie"] == ""  # HttpOnly: the script never sees the session
    # The usage logged out at the end: the cookie is gone.
    assert await page.context.cookies() == []

    # The error envelope reaches the caller as a GatewayError with code and request id.
    failure = await page.evaluate(
        as_function(
            snippet,
            'try { await streamAgent("chat", { nope: 1 }, () => {}); return null; }'
            " catch (err) { return { name: err.constructor.name, status: err.status,"
            " code: err.code, requestId: err.requestId }; }",
            result="null",
        )
    )
    assert failure is not None
    assert failure["name"] == "GatewayError" and failure["status"] == 400
    assert failure["code"] == "invalid_message"  # the demo agent's own JSON error
    # Without the CSRF header the gateway refuses, and the snippet says why.
    refused = await page.evaluate(
        as_function(
            snippet.replace('const CSRF = { "X-CSRF": "1" };', "const CSRF = {};"),
            'try { await sessionApi("PATCH", { a: 1 }); return null; }'
            " catch (err) { return [err.status, err.code, err.requestId]; }",
            result="null",
        )
    )
    assert refused is not None
    status, code, request_id = refused
    assert (status, code) == (403, "csrf_header_missing") and request_id
    await page.close()
