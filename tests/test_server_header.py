"""Issue 12 row 12b: the `Server` header names the product only, never versions (aiohttp's
default was `Python/3.x aiohttp/3.y`), on every response: the gateway's own answers, its error
envelopes, router 404/405s, aiohttp's own parser 400 (answered before any application is
matched), and proxied answers whose upstream sent a `Server` of its own."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from app.middlewares import SERVER_HEADER
from tests.conftest import CSRF
from tests.fake_upstream import RunningGateway, ServedUpstream
from tests.gateway_process import GatewayProcess
from tests.test_http_parsers import exchange


def server_headers(raw: bytes) -> list[bytes]:
    head = raw.partition(b"\r\n\r\n")[0]
    return [line for line in head.split(b"\r\n") if line.lower().startswith(b"server:")]


@pytest.mark.system
def test_every_kind_of_answer_of_a_real_process_says_agent_bff() -> None:
    with GatewayProcess({}) as proc:
        requests = {
            "health": b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "demo page": b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "404": b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "405": b"PUT /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "envelope 403": b"PATCH /apps/demo/session HTTP/1.1\r\nHost: x\r\n"
            b"Connection: close\r\n\r\n",
            "session": b"GET /apps/demo/session HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            # Refused by aiohttp's parser before any application is matched.
            "parser 400": b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: \x01\r\n\r\n",
            "bad request line": b"GET /\x00 HTTP/1.1\r\n\r\n",
        }
        for name, data in requests.items():
            answer = asyncio.run(exchange(proc.port, data))
            assert answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), (name, answer[:200])
            assert server_headers(answer) == [b"Server: agent-bff"], (name, answer[:400])
            assert b"aiohttp" not in answer.partition(b"\r\n\r\n")[0], name
            assert b"Python" not in answer.partition(b"\r\n\r\n")[0], name


async def test_a_proxied_answer_and_stream_never_carry_the_upstreams_server(
    upstream: ServedUpstream, gw: RunningGateway
) -> None:
    async def versioned(request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, headers={"Server": "uvicorn/0.30.1 Python/3.12"})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Server": "gunicorn/22.0"}
        )
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        return response

    upstream.fake.on("/v1/versioned", versioned)
    upstream.fake.on("/v1/stream", stream)
    async with gw.client.post("/apps/shop/agent/versioned", headers=CSRF) as resp:
        assert resp.status == 200
        assert resp.headers.getall("Server") == [SERVER_HEADER]
    async with gw.client.get("/apps/shop/agent/stream") as resp:
        assert resp.status == 200
        assert resp.headers.getall("Server") == [SERVER_HEADER]
        await resp.read()
    async with gw.client.post("/apps/shop/agent/versioned") as resp:  # no X-CSRF: envelope
        assert resp.status == 403
        assert resp.headers.getall("Server") == [SERVER_HEADER]
