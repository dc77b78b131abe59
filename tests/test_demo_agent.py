"""The built-in demo agent: its SSE contract, served in the gateway's process, reached through
the ordinary proxy path; and the demo page's strict CSP."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient

from app.applications import AppConfig, describe_apps
from app.demo_agent import (
    DEMO_PAGE_CSP,
    MAX_MESSAGE_CHARS,
    STATIC_DIR,
    compose_reply,
    create_demo_agent_app,
    demo_page_application,
    sse_event,
    tokenize,
)
from app.keys import UPSTREAM_KEY
from tests.conftest import CSRF, Gateway, GatewayFactory
from tests.fake_upstream import sse_events


def reply_of(body: bytes) -> str:
    """The reply text carried by the `token` events of an event stream, checking its shape."""
    events = sse_events(body.decode())
    assert events[-1] == ("done", "{}"), events[-3:]
    assert {e for e, _ in events[:-1]} == {"token"}
    return "".join(json.loads(data)["text"] for _, data in events[:-1])


@pytest.mark.parametrize(
    "message",
    ["hello", "  two   words ", "", "ünïcödé ✓ emoji 🎉", "x" * 500, "line\nbreaks\tand tabs"],
)
def test_replies_are_deterministic_and_tokens_join_to_the_reply(message: str) -> None:
    reply = compose_reply(message, 3)
    assert reply == compose_reply(message, 3)
    assert "turn 3 " in reply
    tokens = tokenize(reply)
    assert "".join(tokens) == reply
    assert len(tokens) > 10


def test_reply_text() -> None:
    assert compose_reply("  hello   world ", 1) == (
        'You said: "hello world" (2 words). I am the built-in demo agent, streaming this '
        "reply token by token through the gateway. This is turn 1 of our conversation."
    )
    assert compose_reply("", 2).startswith("You sent an empty message. ")
    long = compose_reply("y" * 500, 1)
    assert '"' + "y" * 200 + '…" (1 word)' in long


async def test_demo_agent_contract(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_demo_agent_app(token_delay=0.001))
    resp = await client.post("/chat", json={"message": "hi there"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    body = await resp.read()
    expected = b"".join(
        sse_event("token", {"text": t}) for t in tokenize(compose_reply("hi there", 1))
    )
    assert body == expected + b"event: done\ndata: {}\n\n"
    assert reply_of(body) == compose_reply("hi there", 1)


async def test_demo_agent_counts_turns_per_conversation(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_demo_agent_app(token_delay=0.001))

    async def turn(thread: str | None) -> str:
        headers = {"X-Agent-Thread-Id": thread} if thread else {}
        resp = await client.post("/chat", json={"message": "m"}, headers=headers)
        match = re.search(r"turn (\d+) ", reply_of(await resp.read()))
        assert match is not None
        return match.group(1)

    assert [await turn("a"), await turn("a"), await turn("b"), await turn("a")] == list("1213")
    assert await turn(None) == "1"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"msg": "x"}',
        b'{"message": 5}',
        json.dumps({"message": "z" * (MAX_MESSAGE_CHARS + 1)}).encode(),
    ],
)
async def test_demo_agent_rejects_bad_input_before_streaming(
    aiohttp_client: AiohttpClient, body: bytes
) -> None:
    client = await aiohttp_client(create_demo_agent_app(token_delay=0.001))
    resp = await client.post("/chat", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_message"


# -- through the gateway (default settings: no APPS_FILE) ------------------------------------


@pytest.fixture
async def default_gateway(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory("memory")


async def test_the_default_demo_application_streams_through_the_gateway(
    default_gateway: Gateway,
) -> None:
    gw = default_gateway
    demo_base = gw.app[UPSTREAM_KEY].demo_base
    assert demo_base is not None and demo_base.host == "127.0.0.1"  # loopback only

    async def say(message: str) -> str:
        resp = await gw.client.post(
            "/apps/demo/agent/chat", json={"message": message}, headers=CSRF
        )
        assert resp.status == 200
        assert resp.headers["X-Accel-Buffering"] == "no"
        return reply_of(await resp.read())

    assert await say("hello gateway") == compose_reply("hello gateway", 1)
    assert await say("again") == compose_reply("again", 2)
    resp = await gw.client.delete("/apps/demo/session", headers=CSRF)
    assert resp.status == 204
    assert await say("after logout") == compose_reply("after logout", 1)


async def test_demo_errors_pass_through_unchanged(default_gateway: Gateway) -> None:
    resp = await default_gateway.client.post(
        "/apps/demo/agent/chat", data=b"nope", headers={**CSRF, "Content-Type": "text/plain"}
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_message"


async def test_no_demo_agent_without_a_builtin_application(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    apps = tmp_path / "apps.toml"
    apps.write_text('[apps.shop]\nupstream = "http://127.0.0.1:9/v1"\n')
    gw = await gateway_factory("memory", APPS_FILE=str(apps))
    assert gw.app[UPSTREAM_KEY].demo_base is None


# -- the demo page ---------------------------------------------------------------------------


async def test_demo_page_is_served_with_a_strict_csp(default_gateway: Gateway) -> None:
    resp = await default_gateway.client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert resp.headers["Content-Security-Policy"] == DEMO_PAGE_CSP
    for directive in (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ):
        assert directive in DEMO_PAGE_CSP
    assert "unsafe" not in DEMO_PAGE_CSP
    html = await resp.text()
    # CSP-friendly: no inline script, inline style or inline event handler at all.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert "<style" not in html and not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html)
    for asset, kind in (
        ("/static/app.js", "javascript"),
        ("/static/style.css", "text/css"),
        ("/static/favicon.svg", "image/svg+xml"),
    ):
        assert asset in html
        asset_resp = await default_gateway.client.get(asset)
        assert asset_resp.status == 200, asset
        assert kind in asset_resp.content_type
        assert asset_resp.headers["X-Content-Type-Options"] == "nosniff"


def test_static_assets_do_not_use_eval_or_inline_styles() -> None:
    script = (STATIC_DIR / "app.js").read_text()
    assert "eval(" not in script and "new Function" not in script
    assert ".style." not in script and "innerHTML" not in script
    assert "/agent/chat`" in script and '"X-CSRF": "1"' in script


async def test_static_routes_serve_nothing_outside_the_static_directory(
    default_gateway: Gateway,
) -> None:
    for path in ("/static/../main.py", "/static/%2e%2e/main.py", "/static/..%2fconfig.py"):
        resp = await default_gateway.client.get(path)
        assert resp.status in (403, 404), path
        assert b"create_app" not in await resp.read()


async def test_without_a_builtin_application_the_page_says_what_to_do(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """Before: `/` served the chat page for `demo`, gone with APPS_FILE: a 404 bubble."""
    apps = tmp_path / "apps.toml"
    apps.write_text(
        '[apps.shop]\nupstream = "https://agents.internal:9000/v1"\n\n'
        '[apps.demo]\nupstream = "http://127.0.0.1:9/stub"\n'
    )
    gw = await gateway_factory("memory", APPS_FILE=str(apps))
    resp = await gw.client.get("/")
    assert resp.status == 404
    assert resp.content_type == "text/html"
    assert resp.headers["Content-Security-Policy"] == DEMO_PAGE_CSP
    page = await resp.text()
    assert "No demo application here" in page
    assert f"APPS_FILE={apps}" in page
    # Every loaded application, credentials redacted, and the two lines to add.
    assert "<code>demo</code> &rarr; upstream <code>http://127.0.0.1:9/stub</code>" in page
    assert "<code>shop</code> &rarr; upstream <code>https://agents.internal:9000/v1</code>" in page
    assert '[apps.demo]\nupstream = "builtin:demo"' in page
    assert "<script" not in page and "<style" not in page


async def test_the_page_names_the_builtin_application_it_talks_to(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    apps = tmp_path / "apps.toml"
    apps.write_text(
        '[apps.shop]\nupstream = "http://127.0.0.1:9/v1"\n\n'
        '[apps.helpdesk]\nupstream = "builtin:demo"\n'
    )
    gw = await gateway_factory("memory", APPS_FILE=str(apps))
    resp = await gw.client.get("/")
    assert resp.status == 200
    assert '<html lang="en" data-application="helpdesk">' in await resp.text()
    default = await gateway_factory("memory")
    resp = await default.client.get("/")
    assert '<html lang="en" data-application="demo">' in await resp.text()


def test_demo_page_application_prefers_demo() -> None:
    builtin, other = "builtin:demo", "http://127.0.0.1:9/v1"

    def apps(**upstreams: str) -> dict[str, AppConfig]:
        return {k: AppConfig(app_id=k, upstream=v) for k, v in upstreams.items()}

    assert demo_page_application(apps(zeta=builtin, demo=builtin, alpha=builtin)) == "demo"
    assert demo_page_application(apps(zeta=builtin, demo=other, beta=builtin)) == "beta"
    assert demo_page_application(apps(demo=other)) is None
    assert demo_page_application({}) is None


def test_the_start_up_log_line_lists_every_application() -> None:
    assert (
        describe_apps(
            {
                "b": AppConfig(app_id="b", upstream="http://h:9000/v1"),
                "a": AppConfig(app_id="a", upstream="builtin:demo"),
            }
        )
        == "a -> builtin:demo, b -> http://h:9000/v1"
    )
