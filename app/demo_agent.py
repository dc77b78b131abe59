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
import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from yarl import URL

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


DEMO_STATE_KEY = web.AppKey("demo_state", DemoState)


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


async def demo_page(request: web.Request) -> web.FileResponse:
    """`GET /`: a small chat page that talks to application `demo` through the gateway."""
    return web.FileResponse(
        STATIC_DIR / "index.html",
        headers={
            "Content-Security-Policy": DEMO_PAGE_CSP,
            "Cache-Control": "no-cache",
            "X-Frame-Options": "DENY",
        },
    )
