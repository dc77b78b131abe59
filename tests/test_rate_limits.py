"""The rate limiter (app/ratelimit.py): limits on agent requests, per session and per
application (`APPS_FILE`), shared by every replica through Redis; per process with the memory
store. Through HTTP against a fake upstream, on the memory store, fakeredis and a real
redis-server. The stores' `rate_limit` operation itself (GCRA) is in tests/test_store_contract.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest

from app.applications import RateLimit, parse_rate_limit
from app.config import ConfigError, Settings
from app.keys import STORAGE_APP_KEY
from app.ratelimit import bucket_keys
from app.sessions.backend import StoreUnavailable, TokenBucket
from tests.conftest import CSRF, Gateway, GatewayFactory, RedisRaw, make_settings
from tests.fake_upstream import ServedUpstream
from tests.gateway_process import run_gateway_to_exit
from tests.test_metrics import scrape, value
from tests.test_sessions_http import assert_envelope, reset_stats, session_commands


def apps_file(tmp_path: Path, upstream: ServedUpstream, body: str) -> str:
    path = tmp_path / "apps.toml"
    path.write_text(body.replace("UPSTREAM", str(upstream.base)))
    return str(path)


LIMITED_APPS = """
[apps.shop]
upstream = "UPSTREAM"
rate_limit_per_session = "3/minute"

[apps.blog]
upstream = "UPSTREAM"
rate_limit_per_app = "4/minute"

[apps.both]
upstream = "UPSTREAM"
rate_limit_per_session = "2/minute"
rate_limit_per_app = "5/minute"

[apps.free]
upstream = "UPSTREAM"
"""


@pytest.fixture
async def gw(
    gateway_factory: GatewayFactory, upstream: ServedUpstream, tmp_path: Path, kind: str
) -> Gateway:
    return await gateway_factory(kind, APPS_FILE=apps_file(tmp_path, upstream, LIMITED_APPS))


async def agent(
    gateway: Gateway, app: str, *, jar: bool = True, sid: str | None = None
) -> aiohttp.ClientResponse:
    """One agent request: with the client's cookie jar (one session), or without it (a new
    session each time, or the session `sid`)."""
    path = f"/apps/{app}/agent/chat"
    if jar and sid is None:
        resp = await gateway.client.post(path, headers=CSRF)
        await resp.read()
        return resp
    headers = {**CSRF, **({"Cookie": f"agent_sid={sid}"} if sid else {})}
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.post(gateway.client.make_url(path), headers=headers) as resp,
    ):
        await resp.read()
        return resp


def upstream_calls(upstream: ServedUpstream) -> int:
    return len(upstream.fake.seen)


# -- over the limit: 429 -------------------------------------------------------------------


async def test_per_session_limit(gw: Gateway, upstream: ServedUpstream) -> None:
    for _ in range(3):
        assert (await agent(gw, "shop")).status == 200
    resp = await agent(gw, "shop")
    assert resp.status == 429
    assert_envelope(resp, await resp.json(), "rate_limited")
    # 3/minute: a token every 20 s.
    assert 1 <= int(resp.headers["Retry-After"]) <= 20
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert upstream_calls(upstream) == 3, "a refused request reached the upstream"
    # Another session (another browser) has its own bucket.
    assert (await agent(gw, "shop", jar=False)).status == 200
    # Session API calls are not agent requests: never limited.
    assert (await gw.client.get("/apps/shop/session")).status == 200


async def test_per_application_limit_across_sessions(gw: Gateway, upstream: ServedUpstream) -> None:
    for _ in range(4):
        assert (await agent(gw, "blog", jar=False)).status == 200
    resp = await agent(gw, "blog", jar=False)
    assert resp.status == 429
    assert_envelope(resp, await resp.json(), "rate_limited")
    assert 1 <= int(resp.headers["Retry-After"]) <= 15
    assert upstream_calls(upstream) == 4
    # The refused browser got no session: a flood over the limit creates nothing.
    assert "Set-Cookie" not in resp.headers
    sessions = [k for k in await gw.raw.keys() if k.startswith("agent:sess:blog:")]
    assert len(sessions) == 4
    # Other applications are not affected.
    assert (await agent(gw, "free", jar=False)).status == 200


async def test_a_refused_request_uses_up_neither_bucket(gw: Gateway) -> None:
    """`both`: 2/minute per session, 5/minute per application. A session hammering its own
    limit must not use up the application's budget for everyone else."""
    for _ in range(2):
        assert (await agent(gw, "both")).status == 200
    for _ in range(10):
        assert (await agent(gw, "both")).status == 429
    statuses = [(await agent(gw, "both", jar=False)).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429], "refused requests counted against the app"


async def test_unlimited_applications_are_never_limited(gw: Gateway) -> None:
    for _ in range(20):
        assert (await agent(gw, "free")).status == 200


async def test_tokens_come_back_at_the_configured_rate(
    gateway_factory: GatewayFactory, upstream: ServedUpstream, tmp_path: Path, kind: str
) -> None:
    body = '[apps.fast]\nupstream = "UPSTREAM"\nrate_limit_per_session = "4/second"\n'
    gw = await gateway_factory(kind, APPS_FILE=apps_file(tmp_path, upstream, body))
    statuses = [(await agent(gw, "fast")).status for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]
    await asyncio.sleep(0.35)  # 4/second: a token every 0.25 s; one is back by now
    assert (await agent(gw, "fast")).status == 200


# -- shared by replicas (Redis), per process (memory) ---------------------------------------


@pytest.mark.integration
async def test_limits_are_shared_by_replicas_on_redis(
    gateway_factory: GatewayFactory, upstream: ServedUpstream, tmp_path: Path
) -> None:
    file = apps_file(tmp_path, upstream, LIMITED_APPS)
    one = await gateway_factory("redis", APPS_FILE=file)
    two = await gateway_factory("redis", APPS_FILE=file)  # same Redis, its own client and pool
    assert (await agent(one, "shop")).status == 200
    sid = one.session_id("shop")
    assert sid is not None
    statuses = [(await agent(g, "shop", sid=sid)).status for g in (two, one, two)]
    assert statuses == [200, 200, 429]  # the session's 4th request, on either replica
    # Per application too: 4/minute over both replicas.
    assert [(await agent(g, "blog", jar=False)).status for g in (one, two, one, two, one)] == [
        200,
        200,
        200,
        200,
        429,
    ]


async def test_limits_are_per_process_on_the_memory_store(
    gateway_factory: GatewayFactory, upstream: ServedUpstream, tmp_path: Path
) -> None:
    file = apps_file(tmp_path, upstream, LIMITED_APPS)
    one = await gateway_factory("memory", APPS_FILE=file)
    two = await gateway_factory("memory", APPS_FILE=file)
    statuses = [(await agent(g, "blog", jar=False)).status for g in [one] * 5 + [two] * 5]
    assert statuses == [200] * 4 + [429] + [200] * 4 + [429]  # documented: N replicas, N x


# -- Redis keys and commands ----------------------------------------------------------------


@pytest.mark.integration
async def test_redis_keys_and_one_round_trip_per_check(
    gateway_factory: GatewayFactory, upstream: ServedUpstream, tmp_path: Path
) -> None:
    gw = await gateway_factory(
        "redis", APPS_FILE=apps_file(tmp_path, upstream, LIMITED_APPS), REDIS_AUX_PREFIX="lim:"
    )
    server = gw.redis_server
    assert server is not None
    assert (await agent(gw, "both")).status == 200  # creates the session (app bucket only)
    sid = gw.session_id("both")
    assert sid is not None
    reset_stats(server)
    assert (await agent(gw, "both")).status == 200
    calls = session_commands(server)
    # GETEX (the session) + one EVALSHA (both buckets: GET x2 and SET x2 inside Redis).
    assert calls == {"getex": 1, "evalsha": 1, "get": 2, "set": 2}, calls

    aux = sorted(k for k in await gw.raw.keys() if k.startswith("lim:"))
    assert len(aux) == 2
    assert aux[0] == "lim:rl:{both}:app"
    assert aux[1].startswith("lim:rl:{both}:s:") and sid not in aux[1]
    for key in aux:
        ttl = await gw.raw.ttl(key)
        assert ttl is not None and 0 < ttl <= 60  # gone once the bucket is full again
    sessions = [k for k in await gw.raw.keys() if k.startswith("agent:sess:")]
    assert sessions == [gw.key(sid, "both")]


async def test_a_failing_limit_store_lets_requests_through(
    gw: Gateway, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail open: a rate-limit store failure is logged, never a 500 or 503."""

    async def failing(buckets: Sequence[TokenBucket]) -> float:
        raise StoreUnavailable("ConnectionError: simulated")

    monkeypatch.setattr(gw.app[STORAGE_APP_KEY].backend, "rate_limit", failing)
    monkeypatch.setattr("app.ratelimit._last_fail_open_log", -1e9)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            assert (await agent(gw, "shop")).status == 200
    warnings = [
        r.getMessage() for r in caplog.records if "rate limits not checked" in r.getMessage()
    ]
    assert len(warnings) == 1  # logged, but not once per request


@pytest.mark.parametrize(("wait", "retry_after"), [(0.2, "1"), (1.0, "1"), (19.01, "20")])
async def test_retry_after_is_the_wait_rounded_up_and_at_least_one_second(
    gateway_factory: GatewayFactory,
    upstream: ServedUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    wait: float,
    retry_after: str,
) -> None:
    """What the store says to wait becomes whole seconds, never 0 (a client would retry at
    once), and the refused request never reaches the upstream."""
    gw = await gateway_factory("memory", APPS_FILE=apps_file(tmp_path, upstream, LIMITED_APPS))

    async def over(buckets: Sequence[TokenBucket]) -> float:
        return wait

    monkeypatch.setattr(gw.app[STORAGE_APP_KEY].backend, "rate_limit", over)
    resp = await agent(gw, "shop")
    assert resp.status == 429
    assert resp.headers["Retry-After"] == retry_after
    assert upstream_calls(upstream) == 0


def test_bucket_keys_name_the_application_and_never_the_session_id() -> None:
    sid = "A" * 43
    app_key, session_key = bucket_keys("lim:", "shop", sid)
    assert app_key == "lim:rl:{shop}:app"
    assert session_key is not None and session_key.startswith("lim:rl:{shop}:s:")
    assert sid not in session_key and len(session_key.rsplit(":", 1)[1]) == 32
    # Both keys of one check hash to one Redis Cluster slot: the `{shop}` tag.
    assert {k[k.index("{") : k.index("}") + 1] for k in (app_key, session_key)} == {"{shop}"}
    other_app, other_session = bucket_keys("lim:", "shop", "B" * 43)
    assert other_app == app_key and other_session != session_key
    assert bucket_keys("lim:", "shop", None) == (app_key, None)
    assert bucket_keys("lim:", "blog", sid)[1] != session_key


async def test_limit_checks_are_store_operations_with_their_metrics(gw: Gateway) -> None:
    """A rate-limit check is the session store's `rate_limit` operation: counted and timed
    like every other store operation (ok and error), one per agent request."""
    for _ in range(4):
        await agent(gw, "shop")
    samples = await scrape(gw.client)
    ops = "agent_bff_session_store_operations_total"
    assert value(samples, ops, operation="rate_limit", result="ok") == 4
    latency = "agent_bff_session_store_operation_duration_seconds_count"
    assert value(samples, latency, operation="rate_limit") == 4


@pytest.mark.integration
async def test_a_broken_bucket_key_in_redis_fails_open(
    gateway_factory: GatewayFactory, upstream: ServedUpstream, tmp_path: Path
) -> None:
    gw = await gateway_factory("redis", APPS_FILE=apps_file(tmp_path, upstream, LIMITED_APPS))
    assert isinstance(gw.raw, RedisRaw)
    await gw.raw.client.hset("agent:aux:rl:{blog}:app", "x", "1")  # the script fails: WRONGTYPE
    for _ in range(6):
        assert (await agent(gw, "blog", jar=False)).status == 200


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("30/minute", 30, 60),
        ("600/min", 600, 60),
        ("5/10s", 5, 10),
        ("1000/hour", 1000, 3600),
        ("10/second", 10, 1),
        (" 50000 / day ", 50000, 86400),
        ("7/2h", 7, 7200),
        ("3/Minute", 3, 60),
    ],
)
def test_rate_limit_syntax(text: str, count: int, period: int) -> None:
    assert parse_rate_limit(text) == RateLimit(count=count, period_seconds=period)


@pytest.mark.parametrize(
    "value",
    ['"3/fortnight"', '"0/minute"', '"abc"', "5", '"3/0s"', '"3/8d"', '"-1/minute"', '""'],
)
def test_a_bad_rate_limit_is_a_config_error(tmp_path: Path, value: str) -> None:
    path = tmp_path / "apps.toml"
    path.write_text(f'[apps.shop]\nupstream = "http://127.0.0.1:9"\nrate_limit_per_app = {value}\n')
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"APPS_FILE": str(path)}, dotenv_path=None)
    (problem,) = info.value.problems
    assert "[apps.shop]" in problem and "rate_limit_per_app" in problem


@pytest.mark.system
def test_a_bad_rate_limit_stops_the_process_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "apps.toml"
    path.write_text(
        '[apps.shop]\nupstream = "http://127.0.0.1:9"\nrate_limit_per_session = "lots"\n'
    )
    code, stderr, _ = run_gateway_to_exit({"APPS_FILE": str(path)})
    assert code == 2, stderr
    assert "rate_limit_per_session" in stderr and "[apps.shop]" in stderr


@pytest.mark.parametrize(
    ("prefix", "aux"),
    [
        ("agent:", "agent:aux:"),
        ("agent:aux:", "agent:"),
        ("same:", "same:"),
        ("agent:sess:", "agent:sess:rl:"),
    ],
)
def test_overlapping_prefixes_are_a_config_error(prefix: str, aux: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_settings(REDIS_PREFIX=prefix, REDIS_AUX_PREFIX=aux)
    assert any("REDIS_AUX_PREFIX" in p and "overlap" in p for p in info.value.problems)


@pytest.mark.parametrize("aux", ["a b:", "x{y}:", "aux*:", "x?"])
def test_a_bad_aux_prefix_is_a_config_error(aux: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_settings(REDIS_AUX_PREFIX=aux)
    assert any(p.startswith("REDIS_AUX_PREFIX=") for p in info.value.problems)


def test_default_aux_prefix() -> None:
    settings = make_settings()
    assert settings.redis_aux_prefix == "agent:aux:"
    assert make_settings(REDIS_PREFIX="app1:s:", REDIS_AUX_PREFIX="app1:x:").redis_aux_prefix == (
        "app1:x:"
    )
