"""The gateway middleware (app/middlewares.py): one middleware whose steps run in a fixed order
(metrics, request id, errors, host, application, origin, CSRF, session) and whose failures are
the JSON envelope, never aiohttp's text page. The steps in depth have files of their own:
tests/test_allowed_hosts.py (host), tests/test_csrf_methods.py (CSRF),
tests/test_proxy_routing.py (origin and CORS on agent calls), tests/test_security_headers.py and
tests/test_server_header.py (the prepare hook's headers).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from app.errors import store_full, store_unavailable
from app.main import create_app
from app.middlewares import new_request_id
from app.sessions.backend import StoreFull, StoreUnavailable
from tests.conftest import CSRF, Gateway, GatewayFactory, make_settings
from tests.fake_upstream import ServedUpstream
from tests.test_sessions_http import assert_envelope

# -- request ids --------------------------------------------------------------------------


def test_ids_are_unique_across_batches() -> None:
    ids = [new_request_id() for _ in range(1000)]  # many batches of 64
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    new_request_id()  # a batch is in use
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child_id = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert re.fullmatch(r"[0-9a-f]{32}", child_id)
    assert child_id != new_request_id()  # the parent's next id from the same batch differs


async def test_responses_carry_minted_ids(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory("memory")
    seen = set()
    for _ in range(100):
        resp = await gw.client.get("/healthz")
        seen.add(resp.headers["X-Request-Id"])
    assert len(seen) == 100
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in seen)


@pytest.mark.parametrize("inbound", ["abc-123", "req.1:2_3", "a" * 128])
async def test_a_sane_request_id_is_kept(memory_gateway: Gateway, inbound: str) -> None:
    for path in ("/healthz", "/apps/demo/session", "/apps/nope/session"):
        resp = await memory_gateway.client.get(path, headers={"X-Request-Id": inbound})
        assert resp.headers["X-Request-Id"] == inbound


@pytest.mark.parametrize("inbound", [None, "", "has space", "a" * 129, "<script>", "x\ty"])
async def test_an_insane_request_id_is_replaced(
    memory_gateway: Gateway, inbound: str | None
) -> None:
    headers = {} if inbound is None else {"X-Request-Id": inbound}
    resp = await memory_gateway.client.get("/apps/nope/session", headers=headers)
    minted = resp.headers["X-Request-Id"]
    assert minted != inbound and re.fullmatch(r"[A-Za-z0-9._:-]{8,128}", minted)
    assert (await resp.json())["error"]["request_id"] == minted
    other = await memory_gateway.client.get("/healthz", headers=headers)
    assert other.headers["X-Request-Id"] != minted


async def test_error_envelope_everywhere(memory_gateway: Gateway) -> None:
    client = memory_gateway.client
    resp = await client.get("/no/such/route")
    assert resp.status == 404
    assert_envelope(resp, await resp.json(), "not_found")
    resp = await client.put("/apps/demo/session", json={}, headers=CSRF)
    assert resp.status == 405
    body = await resp.json()
    assert_envelope(resp, body, "method_not_allowed")
    assert "PATCH" in resp.headers["Allow"]


# -- the error envelope ---------------------------------------------------------------


async def test_an_unexpected_failure_is_a_500_envelope(aiohttp_client: AiohttpClient) -> None:
    app = create_app(make_settings())

    async def bug(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    async def late_bug(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"partial")
        raise RuntimeError("after the headers")

    app.router.add_get("/apps/{applicationId}/test-bug", bug)
    app.router.add_get("/apps/{applicationId}/test-late-bug", late_bug)
    client = await aiohttp_client(app)
    resp = await client.get("/apps/demo/test-bug")
    assert resp.status == 500
    assert_envelope(resp, await resp.json(), "internal_error")
    assert "secret internals" not in await resp.text()
    # Once a stream has started there is no second response: the connection is cut.
    resp = await client.get("/apps/demo/test-late-bug")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def test_http_exceptions_are_the_envelope_and_redirects_pass_through(
    aiohttp_client: AiohttpClient,
) -> None:
    """An aiohttp HTTP error raised by a handler becomes the envelope (its code from the reason,
    only `Allow` and `Retry-After` of its headers kept); a redirect is not an error and passes;
    a store failure is 503 with the store's code and `Retry-After`."""
    app = create_app(make_settings())

    async def too_many(request: web.Request) -> web.Response:
        raise web.HTTPTooManyRequests(headers={"Retry-After": "7", "X-Internal": "leak"})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/apps/demo/elsewhere")

    async def store_down(request: web.Request) -> web.Response:
        raise StoreUnavailable("ConnectionError: simulated")

    async def store_is_full(request: web.Request) -> web.Response:
        raise StoreFull("OOM: simulated")

    app.router.add_get("/apps/{applicationId}/test-429", too_many)
    app.router.add_get("/apps/{applicationId}/test-302", redirect)
    app.router.add_get("/apps/{applicationId}/test-503", store_down)
    app.router.add_get("/apps/{applicationId}/test-full", store_is_full)
    client = await aiohttp_client(app)

    resp = await client.get("/apps/demo/test-429")
    assert resp.status == 429
    assert_envelope(resp, await resp.json(), "too_many_requests")
    assert resp.headers["Retry-After"] == "7"
    assert "X-Internal" not in resp.headers

    resp = await client.get("/apps/demo/test-302", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/apps/demo/elsewhere"
    assert resp.content_type != "application/json"
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-Id"])

    for path, expected in (("test-503", store_unavailable()), ("test-full", store_full())):
        resp = await client.get(f"/apps/demo/{path}")
        assert resp.status == 503
        body = await resp.json()
        assert_envelope(resp, body, expected.code)
        assert "simulated" not in body["error"]["message"]
        assert resp.headers["Retry-After"] == expected.headers["Retry-After"]


# -- the order of the steps ---------------------------------------------------------------


async def test_each_step_answers_before_the_next_runs(
    gateway_factory: GatewayFactory, upstream: ServedUpstream, tmp_path: Path
) -> None:
    """A request that fails every check gets the first step's answer: host (421), then the
    application (400 malformed, 404 unknown), then the origin (403), then CSRF (403); nothing
    reaches the store or the upstream until every step passed."""
    apps = tmp_path / "apps.toml"
    apps.write_text(
        f'[apps.shop]\nupstream = "{upstream.base}"\nallowed_origins = ["https://shop.example"]\n'
    )
    gw = await gateway_factory("memory", ALLOWED_HOSTS="gw.example", APPS_FILE=str(apps))
    good_host, foreign = {"Host": "gw.example"}, {"Origin": "https://evil.example"}
    steps: list[tuple[str, dict[str, str], int, str]] = [
        ("/apps/-bad/agent/chat", {"Host": "evil.example", **foreign}, 421, "host_not_allowed"),
        ("/apps/-bad/agent/chat", {**good_host, **foreign}, 400, "invalid_application_id"),
        ("/apps/nope/agent/chat", {**good_host, **foreign}, 404, "unknown_application"),
        ("/apps/shop/agent/chat", {**good_host, **foreign}, 403, "origin_not_allowed"),
        (
            "/apps/shop/agent/chat",
            {**good_host, "Origin": "https://shop.example"},
            403,
            "csrf_header_missing",
        ),
    ]
    for path, headers, status, code in steps:
        resp = await gw.client.post(path, headers=headers, data=b"{}")
        assert resp.status == status, (path, headers)
        assert_envelope(resp, await resp.json(), code)
        assert "Set-Cookie" not in resp.headers
    assert await gw.raw.keys() == []
    assert upstream.fake.seen == []
    resp = await gw.client.post(
        "/apps/shop/agent/chat",
        headers={**good_host, "Origin": "https://shop.example", **CSRF},
        data=b"{}",
    )
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert len(upstream.fake.seen) == 1
