"""The built-in demo agent: a tiny streaming HTTP agent, so the default run works end to end.

It runs in the gateway's process as its own aiohttp server on `127.0.0.1:<random port>` (see
`app.upstream`), and the gateway reaches it through the ordinary proxy path.

Contract (the demo page relies on it):
- `POST /chat` with JSON `{"message": "<text>"}` answers `text/event-stream`: one
  `event: token` / `data: {"text": "<token>"}` event per token, `token_delay` seconds apart,
  then `event: done` / `data: {}`. The tokens joined are the whole reply.
- The reply is deterministic: it quotes the message and counts the turns of the conversation
  named by the `X-Agent-Thread-Id` header the gateway sends (so a new session starts at turn 1).
- A body that is not a JSON object with a string `message` (at most `MAX_MESSAGE_CHARS`) gets
  400 `{"error": {"code": "invalid_message", "message": "..."}}` before any stream starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import html
import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from yarl import URL

from app.applications import DEMO_APP_ID, AppConfig
from app.keys import DEMO_STATE_KEY, SETTINGS_KEY

MAX_MESSAGE_CHARS = 2000
_QUOTE_CHARS = 200
# Turn counters kept for this many conversations (least recently used dropped first).
_MAX_CONVERSATIONS = 10_000
_TOKEN_RE = re.compile(r"\S+\s*")


@dataclass(slots=True)
class DemoState:
    token_delay: float
    turns: OrderedDict[str, int] = field(default_factory=OrderedDict)

    def next_turn(self, thread_id: str | None) -> int:
        """The 1-based turn number of this request within its conversation."""
        if not thread_id:
            return 1
        turn = self.turns.pop(thread_id, 0) + 1
        self.turns[thread_id] = turn
        while len(self.turns) > _MAX_CONVERSATIONS:
            self.turns.popitem(last=False)
        return turn


def compose_reply(message: str, turn: int) -> str:
    """The whole reply text for `message` at `turn` (pure, deterministic)."""
    text = " ".join(message.split())
    words = len(text.split())
    if len(text) > _QUOTE_CHARS:
        text = text[:_QUOTE_CHARS].rstrip() + "…"
    if not text:
        said = "You sent an empty message."
    else:
        said = f'You said: "{text}" ({words} word{"" if words == 1 else "s"}).'
    return (
        f"{said} I am the built-in demo agent, streaming this reply token by token through "
        f"the gateway. This is turn {turn} of our conversation."
    )


def tokenize(reply: str) -> list[str]:
    """Word-sized tokens whose concatenation is exactly `reply`."""
    return _TOKEN_RE.findall(reply)


def sse_event(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _bad_request(message: str) -> web.Response:
    return web.json_response(
        {"error": {"code": "invalid_message", "message": message}},
        status=400,
        headers={"Cache-Control": "no-store"},
    )


async def chat(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _bad_request('The body must be JSON: {"message": "..."}.')
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str):
        return _bad_request('The body must be JSON: {"message": "..."}.')
    if len(message) > MAX_MESSAGE_CHARS:
        return _bad_request(f"The message is longer than {MAX_MESSAGE_CHARS} characters.")
    state = request.app[DEMO_STATE_KEY]
    turn = state.next_turn(request.headers.get("X-Agent-Thread-Id"))
    tokens = tokenize(compose_reply(message, turn))

    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    # The gateway hanging up is normal (the browser left): stop quietly.
    with contextlib.suppress(ConnectionError):
        for i, token in enumerate(tokens):
            if i:
                await asyncio.sleep(state.token_delay)
            await response.write(sse_event("token", {"text": token}))
        await response.write(sse_event("done", {}))
        await response.write_eof()
    return response


async def describe(request: web.Request) -> web.Response:
    return web.json_response(
        {"agent": "agent-bff built-in demo", "endpoints": {"POST /chat": {"message": "text"}}}
    )


def create_demo_agent_app(token_delay: float) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[DEMO_STATE_KEY] = DemoState(token_delay=token_delay)
    app.router.add_post("/chat", chat)
    app.router.add_get("/", describe)
    return app


async def start_demo_agent(
    *, token_delay: float, shutdown_timeout: float
) -> tuple[web.AppRunner, URL]:
    """Serve the demo agent on a random loopback port; returns (runner, base URL).

    `handler_cancellation=True`: when the gateway drops the connection (the browser left),
    the reply stops at once, like a real agent that honours disconnects.
    """
    runner = web.AppRunner(
        create_demo_agent_app(token_delay),
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
        access_log=None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
    except BaseException:
        await runner.cleanup()
        raise
    return runner, URL.build(scheme="http", host=host, port=port)


# -- the demo page (served by the gateway itself, at `/`) ----------------------------------

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Strict: no inline script or style anywhere; the page only talks to this origin.
DEMO_PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


_DEMO_PAGE_HEADERS = {
    "Content-Security-Policy": DEMO_PAGE_CSP,
    "Cache-Control": "no-cache",
    "X-Frame-Options": "DENY",
}


def demo_page_application(apps: Mapping[str, AppConfig]) -> str | None:
    """The application the demo page talks to: `demo` when it runs on the built-in demo agent,
    else the first (by id) that does; None when no configured application does."""
    demo = apps.get(DEMO_APP_ID)
    if demo is not None and demo.is_builtin_demo:
        return DEMO_APP_ID
    return next((app_id for app_id in sorted(apps) if apps[app_id].is_builtin_demo), None)


@functools.lru_cache(maxsize=8)
def _page_for(app_id: str) -> bytes:
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    marker = 'data-application="demo"'
    assert marker in page, "index.html lost its data-application attribute"
    return page.replace(marker, f'data-application="{html.escape(app_id)}"').encode()


def no_demo_page(apps: Mapping[str, AppConfig], apps_file: str | None) -> str:
    """The page `/` answers (404) when no application runs on the built-in demo agent."""
    listed = "".join(
        f"<li><code>{html.escape(a.app_id)}</code> &rarr; upstream "
        f"<code>{html.escape(a.upstream)}</code></li>"
        for a in sorted(apps.values(), key=lambda a: a.app_id)
    )
    source = f"<code>APPS_FILE={html.escape(apps_file)}</code>" if apps_file else "APPS_FILE"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>agent-bff: no demo application</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/style.css">
</head><body><main class="notice">
<h1>No demo application here</h1>
<p>This page chats with the built-in demo agent, but none of the applications loaded from
{source} uses it. Your frontends call <code>/apps/&lt;applicationId&gt;/session</code> and
<code>/apps/&lt;applicationId&gt;/agent/&lt;path&gt;</code> directly.</p>
<p>Applications loaded:</p>
<ul>{listed}</ul>
<p>To get the demo page back, add this to the applications file and restart:</p>
<pre><code>[apps.demo]
upstream = "builtin:demo"</code></pre>
</main></body></html>
"""


async def demo_page(request: web.Request) -> web.Response:
    """`GET /`: a small chat page that talks, through the gateway, to the application on the
    built-in demo agent (`demo` without `APPS_FILE`); a 404 page saying what to do if none."""
    settings = request.app[SETTINGS_KEY]
    app_id = demo_page_application(settings.apps)
    if app_id is None:
        return web.Response(
            text=no_demo_page(settings.apps, settings.apps_file),
            status=404,
            content_type="text/html",
            headers=_DEMO_PAGE_HEADERS,
        )
    return web.Response(
        body=_page_for(app_id), content_type="text/html", headers=_DEMO_PAGE_HEADERS
    )
