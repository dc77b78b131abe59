"""Rotation racing writes that carry the old cookie (issue 12 row 8).

A write with the old id that arrives after (or while) the session is rotated must neither fork
a new empty session (a 200 with a fresh cookie, which would also replace the browser's new
one) nor lose what it was told was saved: it either lands before the rotation (and is carried
into the new id) or gets 409 `session_rotated` with no `Set-Cookie`, so the browser keeps the
new cookie. The old id never reads or writes data again. Memory store, fakeredis, a real
redis-server; and headless Chromium (fetches racing an upstream's `X-Session-Rotate`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser

from app.keys import STORAGE_APP_KEY
from app.sessions.backend import SessionBackend
from tests.backends import WrappedBackend
from tests.conftest import CSRF, Gateway, GatewayProcessFactory
from tests.redis_server import RedisServer
from tests.test_sessions_http import parse_set_cookie, patch, set_cookie_headers, stored

ROTATE = "/apps/demo/session/rotate"
SESSION = "/apps/demo/session"
WRITES = 200


async def old_cookie_write(
    http: aiohttp.ClientSession, gateway: Gateway, sid: str, n: int
) -> tuple[int, str | None, list[str]]:
    """PATCH `{"w<n>": n}` with only `sid` as the cookie: (status, error code, Set-Cookie)."""
    headers = {**CSRF, "Cookie": f"agent_sid={sid}"}
    url = gateway.client.make_url(SESSION)
    async with http.patch(url, json={f"w{n}": n}, headers=headers) as resp:
        body = await resp.json()
        code = body["error"]["code"] if resp.status >= 400 else None
        return resp.status, code, set_cookie_headers(resp)


async def test_old_cookie_writes_racing_a_rotation_never_fork_nor_lose_data(
    gateway: Gateway,
) -> None:
    await patch(gateway.client, {"login": "alice"})
    old = gateway.session_id()
    assert old is not None

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        answered = 0
        some_answered = asyncio.Event()

        async def rotate() -> int:
            await some_answered.wait()  # writes before, during and after the rotation
            resp = await gateway.client.post(ROTATE, headers=CSRF)
            return resp.status

        async def write(n: int) -> tuple[int, str | None, list[str]]:
            nonlocal answered
            result = await old_cookie_write(http, gateway, old, n)
            answered += 1
            if answered == WRITES // 10:
                some_answered.set()
            return result

        rotation = asyncio.ensure_future(rotate())
        results = list(await asyncio.gather(*(write(n) for n in range(WRITES))))
        rotated = await rotation
        # And once more after the rotation surely finished: a late write.
        late = await old_cookie_write(http, gateway, old, WRITES)
    assert rotated == 200
    results.append(late)

    new = gateway.session_id()
    assert new is not None and new != old
    final = (await stored(gateway, new))["data"]
    outcomes = Counter(f"{status} {code}" for status, code, _ in results)
    forks = [r for r in results if r[2]]
    lost = [n for n, (status, _, _) in enumerate(results) if status == 200 and f"w{n}" not in final]
    assert forks == [], f"{len(forks)} writes forked a new session ({outcomes})"
    assert lost == [], f"{len(lost)} acknowledged writes lost ({outcomes})"
    assert final["login"] == "alice"
    assert set(outcomes) <= {"200 None", "409 session_rotated", "409 session_conflict"}, outcomes
    assert late[:2] == (409, "session_rotated")
    # The old id reads nothing and writes nothing.
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.get(gateway.client.make_url(SESSION), headers={"Cookie": f"agent_sid={old}"}) as resp,
    ):
        assert resp.status == 409
        body: Any = await resp.json()
        assert body["error"]["code"] == "session_rotated"
        assert set_cookie_headers(resp) == []
    acknowledged = sum(1 for status, _, _ in results if status == 200)
    assert len(final) - 1 == acknowledged, "only acknowledged writes are in the session"


# -- in Chromium -------------------------------------------------------------------------------

# A frontend's writes racing a rotation (a login step) in one page: each write retries on a 409
# (`session_rotated`: the browser now holds the new cookie; `session_conflict`), as the API
# asks. Returns every write's answers and the final session.
RACE_PAGE_SCRIPT = """async ([writes]) => {
    const send = (method, path, body) => fetch(path, {
        method, headers: {"X-CSRF": "1", "Content-Type": "application/json"},
        body: body === undefined ? undefined : JSON.stringify(body)});
    await send("PATCH", "/apps/demo/session", {login: "alice"});
    const write = async (n) => {
        const answers = [];
        for (let attempt = 0; attempt < 8; attempt++) {
            const resp = await send("PATCH", "/apps/demo/session", {["w" + n]: n});
            const body = await resp.json();
            answers.push(resp.status === 200 ? "200" : resp.status + " " + body.error.code);
            if (resp.status !== 409) break;
        }
        return answers;
    };
    const pending = [];
    for (let n = 0; n < writes; n++) {
        pending.push(write(n));
        if (n === Math.floor(writes / 3)) pending.push(send("POST", "/apps/demo/session/rotate")
            .then(r => ["rotate " + r.status]));
        await new Promise(r => setTimeout(r, 1));
    }
    const answers = await Promise.all(pending);
    const final = await (await send("GET", "/apps/demo/session")).json();
    return {answers, final: final.data};
}"""


@pytest.mark.browser
@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_fetches_racing_a_rotation_lose_nothing_in_chromium(
    browser: Browser,
    gateway_process: GatewayProcessFactory,
    request: pytest.FixtureRequest,
    store: str,
) -> None:
    env = {"SESSION_STORE": store}
    if store == "redis":
        server: RedisServer = request.getfixturevalue("shared_redis")
        env["REDIS_URL"] = server.url
    proc = gateway_process(env)
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(proc.url + "/")
    lost_total = 0
    for _ in range(3):  # three logins in a row, each raced by 30 writes
        result: Any = await page.evaluate(RACE_PAGE_SCRIPT, [30])
        answers: list[list[str]] = result["answers"]
        final: dict[str, Any] = result["final"]
        assert ["rotate 200"] in answers, answers
        writes = [a for a in answers if not a[0].startswith("rotate")]
        assert all(a[-1] == "200" for a in writes), writes  # every write got through
        lost = [n for n in range(30) if final.get(f"w{n}") != n]
        lost_total += len(lost)
        assert final.get("login") == "alice", final
        assert set(final) <= {"login", *(f"w{n}" for n in range(30))}
        cookies = [c for c in await context.cookies() if c["name"] == "agent_sid"]
        assert len(cookies) == 1
        await page.evaluate(
            "fetch('/apps/demo/session', {method: 'DELETE', headers: {'X-CSRF': '1'}})"
        )
    assert lost_total == 0, f"{lost_total} acknowledged writes lost"
    await context.close()


# -- the rotation's own edge cases -------------------------------------------------------------


class ReplaceTwice(WrappedBackend):
    """`replace` whose first reply is lost: it is sent again (as `RedisBackend._run` retries),
    so the rotation gets back its own tombstone."""

    async def replace(self, key: str, value: bytes, ttl: int) -> bytes | None:
        await self.inner.replace(key, value, ttl)
        return await self.inner.replace(key, value, ttl)


class ReplaceTogether(WrappedBackend):
    """Holds each `replace` until `count` rotations have reached it (concurrent rotations)."""

    def __init__(self, inner: SessionBackend, count: int) -> None:
        super().__init__(inner)
        self.barrier = asyncio.Barrier(count)

    async def replace(self, key: str, value: bytes, ttl: int) -> bytes | None:
        await asyncio.wait_for(self.barrier.wait(), 5)
        return await self.inner.replace(key, value, ttl)


async def test_a_retried_tombstone_is_recognised_as_this_rotations_own(gateway: Gateway) -> None:
    await patch(gateway.client, {"a": 1})
    old = gateway.session_id()
    storage = gateway.app[STORAGE_APP_KEY]
    storage.backend = ReplaceTwice(storage.backend)
    resp = await gateway.client.post(ROTATE, headers=CSRF)
    assert resp.status == 200 and await resp.json() == {"data": {"a": 1}, "rotated": True}
    new = gateway.session_id()
    assert new not in (None, old)
    assert (await stored(gateway, new or ""))["data"] == {"a": 1}


async def test_two_rotations_of_one_id_make_one_new_session(gateway: Gateway) -> None:
    await patch(gateway.client, {"a": 1})
    old = gateway.session_id()
    assert old is not None
    storage = gateway.app[STORAGE_APP_KEY]
    storage.backend = ReplaceTogether(storage.backend, 2)

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:

        async def rotate() -> tuple[int, Any, list[str]]:
            headers = {**CSRF, "Cookie": f"agent_sid={old}"}
            async with http.post(gateway.client.make_url(ROTATE), headers=headers) as resp:
                return resp.status, await resp.json(), set_cookie_headers(resp)

        answers = sorted(await asyncio.gather(rotate(), rotate()), key=lambda a: a[0])
    (ok, ok_body, ok_cookies), (lost, lost_body, lost_cookies) = answers
    assert (ok, ok_body) == (200, {"data": {"a": 1}, "rotated": True})
    assert (lost, lost_body["error"]["code"], lost_cookies) == (409, "session_rotated", [])
    # One new session (the loser's copy was removed) and the old id's tombstone.
    keys = await gateway.raw.keys()
    assert len(keys) == 2 and gateway.key(old) in keys
    (cookie,) = ok_cookies
    _, new, _ = parse_set_cookie(cookie)
    assert (await stored(gateway, new))["data"] == {"a": 1}


async def test_a_logout_with_the_old_cookie_after_a_rotation_is_409_and_ends_nothing(
    gateway: Gateway,
) -> None:
    """Issue 12 attack E: "log out" in a second tab while the first tab's login rotated the id.
    It used to delete the tombstone, answer 204 and expire the browser's (new) cookie, while
    the rotated session lived on. Now: 409 `session_rotated`, no `Set-Cookie`, the tombstone
    and the rotated session stay; the logout retried with the new cookie ends it."""
    await patch(gateway.client, {"user": "alice"})
    old = gateway.session_id()
    resp = await gateway.client.post(ROTATE, headers=CSRF)
    assert resp.status == 200
    new = gateway.session_id()
    assert old is not None and new not in (None, old)

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:

        async def call(method: str, sid: str) -> tuple[int, Any, list[str]]:
            headers = {**CSRF, "Cookie": f"agent_sid={sid}"}
            async with http.request(method, gateway.client.make_url(SESSION), headers=headers) as r:
                body = await r.json() if r.status != 204 else None
                return r.status, body, set_cookie_headers(r)

        status, body, cookies = await call("DELETE", old)
        assert (status, body["error"]["code"], cookies) == (409, "session_rotated", [])
        assert gateway.key(old) in await gateway.raw.keys(), "the tombstone was deleted"
        assert (await stored(gateway, new or ""))["data"] == {"user": "alice"}
        status, body, _ = await call("GET", old)  # the old id still reads nothing
        assert (status, body["error"]["code"]) == (409, "session_rotated")

        status, _, cookies = await call("DELETE", new or "")
        assert status == 204 and [parse_set_cookie(c)[1] for c in cookies] == [""]
    assert gateway.key(new or "") not in await gateway.raw.keys()
