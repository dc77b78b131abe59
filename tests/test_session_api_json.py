"""The session API's JSON fast paths keep the strict input rules and the response bytes.

`PATCH` skips the nesting walk when the body has too few `{`/`[` to nest too deep, skips the
lone-surrogate check when it has no `\\u` escape, and reads an already buffered body without
arming the body timeout; responses are built from prepared headers and bytes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from tests.conftest import CSRF, GatewayFactory

PATH = "/apps/demo/session"
JSON = {**CSRF, "Content-Type": "application/json"}


async def test_brackets_inside_strings_are_not_nesting(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory("memory")
    text = "[{" * 200
    resp = await gw.client.patch(PATH, json={"a": text, "b": ["]}" * 100]}, headers=CSRF)
    assert resp.status == 200
    assert (await resp.json())["data"] == {"a": text, "b": ["]}" * 100]}
    # Brackets in strings do not hide real nesting past the limit.
    deep = b'{"s":"' + b"[" * 100 + b'","a":' + b"[" * 65 + b"]" * 65 + b"}"
    resp = await gw.client.patch(PATH, data=deep, headers=JSON)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_json"


async def test_escapes_are_still_checked(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory("memory")
    for body in (b'{"a":"\\uD800"}', b'{"a":"x\\udc00y"}'):
        resp = await gw.client.patch(PATH, data=body, headers=JSON)
        assert resp.status == 400, body
    # Valid escapes (a surrogate pair, an escaped backslash before a `u`) are fine.
    resp = await gw.client.patch(PATH, data=b'{"a":"\\ud83d\\ude00","b":"\\\\ud800"}', headers=JSON)
    assert resp.status == 200
    assert (await resp.json())["data"] == {"a": "\U0001f600", "b": "\\ud800"}


async def test_a_body_arriving_in_pieces_is_read_whole(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory("memory")

    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b'{"a":', b'"slow",', b'"b":2}'):
            await asyncio.sleep(0.05)
            yield piece

    resp = await gw.client.patch(PATH, data=pieces(), headers=JSON)
    assert resp.status == 200
    assert (await resp.json())["data"] == {"a": "slow", "b": 2}


async def test_response_bytes_and_headers(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory("memory")
    resp = await gw.client.patch(PATH, json={"é": [1, 2.5, None, "x"], "b": None}, headers=CSRF)
    assert resp.status == 200
    # What `json.dumps` writes (ASCII escapes, ", " and ": "), as `web.json_response` did.
    assert await resp.read() == json.dumps({"data": {"é": [1, 2.5, None, "x"]}}).encode()
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-store"
    resp = await gw.client.get(PATH)
    assert await resp.read() == json.dumps({"data": {"é": [1, 2.5, None, "x"]}}).encode()
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Content-Length"] == str(len(await resp.read()))
