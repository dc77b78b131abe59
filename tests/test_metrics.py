"""`GET /metrics` (Prometheus, one registry per app) and the access log's session hash."""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.request
from collections.abc import Iterator

import aiohttp
import prometheus_client
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient, AiohttpServer

from app import fast_metrics, logs
from app.keys import METRICS_KEY
from app.loadkit.ports import free_port
from app.main import create_app
from app.sessions.backend import StoreUnavailable
from app.sessions.memory import MemoryBackend
from tests.conftest import CSRF, GatewayFactory, GatewayProcessFactory, make_settings
from tests.fake_upstream import (
    app_settings,
    run_gateway,
    serve_upstream,
    sse,
    sse_events,
    start_sse,
)
from tests.redis_topologies import RedisClusterTopology

SESSION_ROUTE = "/apps/{applicationId}/session"
AGENT_ROUTE = "/apps/{applicationId}/agent/{path}"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(
    client: aiohttp.ClientSession | TestClient[web.Request, web.Application],
) -> Samples:
    async with client.get("/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(await response.text())


@pytest.fixture(params=["auto", "off"])
def fast_paths(request: pytest.FixtureRequest) -> str:
    """`FAST_PATHS`: the per-request series as app/fast_metrics.py's plain numbers (`auto`) or
    prometheus-client's `Counter`/`Histogram` (`off`); both must export the same."""
    value: str = request.param
    return value


def uses_fast_series(app: web.Application) -> bool:
    metrics = app[METRICS_KEY]
    return metrics.fast and isinstance(metrics.requests, fast_metrics.FastCounter)


async def test_requests_are_counted_by_route_pattern_method_and_status(
    gateway_factory: GatewayFactory, fast_paths: str
) -> None:
    gw = await gateway_factory("memory", FAST_PATHS=fast_paths)
    client = gw.client
    assert uses_fast_series(client.app) is (fast_paths == "auto")
    assert (await client.patch("/apps/demo/session", json={"a": 1}, headers=CSRF)).status == 200
    for _ in range(2):
        assert (await client.get("/apps/demo/session")).status == 200
    assert (await client.get("/apps/Bad!Id/session")).status == 400
    assert (await client.get("/apps/nosuchapp/session")).status == 404
    assert (await client.get("/no/such/path/4711")).status == 404

    samples = await scrape(client)
    requests = "agent_bff_http_requests_total"
    demo = {"application": "demo", "route": SESSION_ROUTE}
    # Unknown and malformed ids are refused before the gateway takes them for an application.
    none = {"application": "-", "route": SESSION_ROUTE}
    assert value(samples, requests, **demo, method="PATCH", status="200") == 1
    assert value(samples, requests, **demo, method="GET", status="200") == 2
    assert value(samples, requests, **none, method="GET", status="400") == 1
    assert value(samples, requests, **none, method="GET", status="404") == 1
    unmatched = {"application": "-", "route": "unmatched"}
    assert value(samples, requests, **unmatched, method="GET", status="404") == 1
    duration = "agent_bff_http_request_duration_seconds_count"
    assert value(samples, duration, **demo, method="GET") == 2
    assert value(samples, duration, **none, method="GET") == 2
    assert value(samples, duration, **demo, method="PATCH") == 1
    # Raw paths and ids never become label values (bounded cardinality).
    labels = {v for (_, pairs) in samples for (_, v) in pairs}
    assert not {v for v in labels if "Bad" in v or "nosuchapp" in v or "4711" in v}
    applications = {v for (_, pairs) in samples for (k, v) in pairs if k == "application"}
    assert applications == {"demo", "-"}
    # The scrape itself is in flight while it renders; nothing else is.
    assert value(samples, "agent_bff_http_requests_in_flight") == 1
    assert value(samples, "agent_bff_memory_sessions") == 1


async def test_each_app_has_its_own_registry(aiohttp_client: AiohttpClient) -> None:
    one = await aiohttp_client(create_app(make_settings()))
    two = await aiohttp_client(create_app(make_settings()))
    for _ in range(3):
        assert (await one.get("/healthz")).status == 200
    requests = "agent_bff_http_requests_total"
    healthz = {"application": "-", "route": "/healthz", "method": "GET", "status": "200"}
    assert value(await scrape(one), requests, **healthz) == 3
    assert value(await scrape(two), requests, **healthz) == 0
    assert prometheus_client.REGISTRY.get_sample_value(requests, healthz) is None


class FlakyBackend(MemoryBackend):
    """The memory store, unreachable while `down` (as the Redis backend fails: a wrapped
    connection error)."""

    down = False

    async def get_and_touch(self, key: str, ttl: int) -> bytes | None:
        if self.down:
            try:
                raise ConnectionRefusedError("connection refused")
            except ConnectionRefusedError as err:
                raise StoreUnavailable("ConnectionRefusedError: refused") from err
        return await super().get_and_touch(key, ttl)


async def test_store_operations_errors_and_latency(
    aiohttp_client: AiohttpClient, fast_paths: str
) -> None:
    backend = FlakyBackend()
    settings = make_settings(FAST_PATHS=fast_paths)
    client = await aiohttp_client(create_app(settings, backend=backend))
    assert uses_fast_series(client.app) is (fast_paths == "auto")
    assert (await client.patch("/apps/demo/session", json={"a": 1}, headers=CSRF)).status == 200
    assert (await client.get("/apps/demo/session")).status == 200
    backend.down = True
    response = await client.get("/apps/demo/session")
    assert response.status == 503

    samples = await scrape(client)
    ops = "agent_bff_session_store_operations_total"
    assert value(samples, ops, operation="create", result="ok") == 1
    assert value(samples, ops, operation="get_and_touch", result="ok") == 1
    assert value(samples, ops, operation="get_and_touch", result="error") == 1
    errors = "agent_bff_session_store_errors_total"
    assert value(samples, errors, operation="get_and_touch", error="ConnectionRefusedError") == 1
    latency = "agent_bff_session_store_operation_duration_seconds_count"
    assert value(samples, latency, operation="get_and_touch") == 2
    assert value(samples, latency, operation="create") == 1
    requests = "agent_bff_http_requests_total"
    labels = {"application": "demo", "route": SESSION_ROUTE, "method": "GET", "status": "503"}
    assert value(samples, requests, **labels) == 1


@pytest.mark.integration
async def test_redis_pool_usage_is_exported(
    gateway_factory: GatewayFactory, fast_paths: str
) -> None:
    # A standalone pool is counted through redis-py's public `get_connection_count()`: the
    # same with the fenced internals off.
    gw = await gateway_factory("redis", REDIS_MAX_CONNECTIONS="7", FAST_PATHS=fast_paths)
    assert (await gw.client.patch("/apps/demo/session", json={"a": 1}, headers=CSRF)).status == 200
    samples = await scrape(gw.client)
    assert value(samples, "agent_bff_redis_pool_max_connections") == 7
    idle = value(samples, "agent_bff_redis_pool_connections", state="idle")
    in_use = value(samples, "agent_bff_redis_pool_connections", state="in_use")
    # At rest every connection the requests used is back in the pool.
    assert idle >= 1
    assert in_use == 0
    ops = "agent_bff_session_store_operations_total"
    assert value(samples, ops, operation="create", result="ok") == 1


@pytest.mark.integration
async def test_pipelined_batches_and_commands_are_exported(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory("redis")
    assert (await gw.client.patch("/apps/demo/session", json={"a": 1}, headers=CSRF)).status == 200
    before = await scrape(gw.client)
    batches = value(before, "agent_bff_redis_pipelined_batches_total")
    commands = value(before, "agent_bff_redis_pipelined_commands_total")
    assert batches >= 1 and commands >= batches
    reads = await asyncio.gather(*(gw.client.get("/apps/demo/session") for _ in range(20)))
    assert all(r.status == 200 for r in reads)
    after = await scrape(gw.client)
    assert value(after, "agent_bff_redis_pipelined_commands_total") == commands + 20
    assert value(after, "agent_bff_redis_pipelined_batches_total") < batches + 20


async def test_active_streams_follow_open_streams(aiohttp_server: AiohttpServer) -> None:
    upstream = await serve_upstream(aiohttp_server)
    release = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse("token", {"text": "hello"}))
        await release.wait()
        await response.write(sse("done", {}))
        return response

    upstream.fake.on("/v1/stream", stream)
    async with run_gateway(app_settings(upstream.base)) as gw:
        async with gw.client.post("/apps/shop/agent/stream", headers=CSRF) as response:
            assert response.status == 200
            first = await response.content.readuntil(b"\n\n")
            assert sse_events(first.decode())[0][0] == "token"
            during = await scrape(gw.client)
            release.set()
            rest = await response.read()
        assert sse_events(rest.decode())[-1][0] == "done"
        after = await scrape(gw.client)
    assert value(during, "agent_bff_active_streams", application="shop") == 1
    assert value(after, "agent_bff_active_streams", application="shop") == 0
    requests = "agent_bff_http_requests_total"
    shop = {"application": "shop", "route": AGENT_ROUTE}
    assert value(after, requests, **shop, method="POST", status="200") == 1
    assert value(after, "agent_bff_http_requests_in_flight") == 1  # the scrape itself
    # The stream lasted at least from the first event to the scrape that released it.
    streams = "agent_bff_stream_duration_seconds"
    assert value(during, streams + "_count", application="shop") == 0
    assert value(after, streams + "_count", application="shop") == 1
    assert 0 < value(after, streams + "_sum", application="shop") < 10
    first_byte = "agent_bff_upstream_time_to_first_byte_seconds"
    assert value(during, first_byte + "_count", application="shop") == 1


async def test_upstream_errors_are_counted_by_application_and_kind(
    aiohttp_server: AiohttpServer,
) -> None:
    errors = "agent_bff_upstream_errors_total"
    refused = app_settings(f"http://127.0.0.1:{free_port()}/v1")
    async with run_gateway(refused) as gw:
        async with gw.client.post("/apps/shop/agent/chat", headers=CSRF) as response:
            assert response.status == 502
        samples = await scrape(gw.client)
    assert value(samples, errors, application="shop", kind="unavailable") == 1

    upstream = await serve_upstream(aiohttp_server)

    async def silent(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse("token", {"text": "first"}))
        await asyncio.sleep(30)
        return response

    upstream.fake.on("/v1/chat", silent)
    async with run_gateway(app_settings(upstream.base, idle_timeout_seconds=0.3)) as gw:
        async with gw.client.post("/apps/shop/agent/chat", headers=CSRF) as response:
            body = await response.read()
        assert sse_events(body.decode())[-1][0] == "error"
        samples = await scrape(gw.client)
    assert value(samples, errors, application="shop", kind="idle_timeout") == 1
    assert value(samples, errors, application="shop", kind="unavailable") == 0


async def test_upstream_first_byte_and_stream_duration_histograms(
    aiohttp_server: AiohttpServer,
) -> None:
    """An upstream that thinks 0.3 s before its headers, then streams for 0.4 s."""
    upstream = await serve_upstream(aiohttp_server)

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        response = await start_sse(request)
        await response.write(sse("token", {"text": "first"}))
        await asyncio.sleep(0.4)
        await response.write(sse("done", {}))
        return response

    upstream.fake.on("/v1/slow", slow)
    async with run_gateway(app_settings(upstream.base)) as gw:
        async with gw.client.post("/apps/shop/agent/slow", headers=CSRF) as response:
            assert response.status == 200
            await response.read()
        samples = await scrape(gw.client)
    first_byte = "agent_bff_upstream_time_to_first_byte_seconds"
    shop = {"application": "shop"}
    assert value(samples, first_byte + "_count", **shop) == 1
    assert 0.3 <= value(samples, first_byte + "_sum", **shop) < 2
    assert value(samples, first_byte + "_bucket", **shop, le="0.25") == 0
    assert value(samples, first_byte + "_bucket", **shop, le="2.5") == 1
    streams = "agent_bff_stream_duration_seconds"
    assert value(samples, streams + "_count", **shop) == 1
    stream_time = value(samples, streams + "_sum", **shop)
    request_time = value(
        samples,
        "agent_bff_http_request_duration_seconds_sum",
        **shop,
        route=AGENT_ROUTE,
        method="POST",
    )
    assert 0.4 <= stream_time <= request_time - 0.25  # from the first byte: the 0.3 s wait is out
    assert value(samples, streams + "_bucket", **shop, le="0.1") == 0
    assert value(samples, streams + "_bucket", **shop, le="1.0") == 1
    assert value(samples, "agent_bff_active_streams", **shop) == 0


# -- the access log -------------------------------------------------------------------------


def test_session_hash_is_salted_and_short() -> None:
    sid = "A" * 43
    logs.set_log_salt("pepper")
    salted = logs.session_hash(sid)
    assert salted == hashlib.sha256(b"pepper" + sid.encode()).hexdigest()[:16]
    logs.set_log_salt(None)
    first_random = logs.session_hash(sid)
    logs.set_log_salt(None)
    assert logs.session_hash(sid) != first_random  # a fresh random salt each time
    assert first_random != hashlib.sha256(sid.encode()).hexdigest()[:16]


async def test_json_access_lines_carry_a_salted_session_hash_never_the_id(
    gateway_process: GatewayProcessFactory,
) -> None:
    proc = gateway_process({"LOG_FORMAT": "json", "LOG_SALT": "pepper", "SESSION_STORE": "memory"})
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{proc.url}/apps/demo/session?token=secret-query",
        data=b'{"a": 1}',
        method="PATCH",
        headers={"X-CSRF": "1", "Content-Type": "application/json", "X-Request-Id": "req-4711"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        cookie = response.headers["Set-Cookie"]
    sid = cookie.split(";", 1)[0].split("=", 1)[1]
    assert proc.stop() == 0
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("request_id") == "req-4711"]
    assert len(access) == 1, proc.stderr
    line = access[0]
    assert line["session"] == hashlib.sha256(b"pepper" + sid.encode()).hexdigest()[:16]
    assert line["application"] == "demo"
    assert line["status"] == 200
    assert line["method"] == "PATCH"
    assert line["path"] == "/apps/demo/session"
    assert isinstance(line["duration_ms"], float | int)
    # Never the id, the cookie or the query string (it may carry tokens).
    assert sid not in proc.stderr
    assert "secret-query" not in proc.stderr


@pytest.fixture
def cluster() -> Iterator[RedisClusterTopology]:
    with RedisClusterTopology(3) as topology:
        yield topology


@pytest.mark.redis_server
async def test_a_cluster_pool_is_counted_through_the_fence_and_only_bounded_without_it(
    cluster: RedisClusterTopology, gateway_process: GatewayProcessFactory
) -> None:
    """A cluster node has no public connection count: app/redis_internals.py reads it
    (`FAST_PATHS=auto`); with `FAST_PATHS=off` only the bound is exported."""
    env = {"SESSION_STORE": "redis", "REDIS_URL": cluster.url, "REDIS_MAX_CONNECTIONS": "5"}
    fenced = gateway_process({**env, "FAST_PATHS": "auto"})
    public = gateway_process({**env, "FAST_PATHS": "off"})
    for proc in (fenced, public):
        async with aiohttp.ClientSession(str(proc.url)) as client:
            for n in range(6):  # sessions on every primary, most likely
                async with client.patch("/apps/demo/session", json={"n": n}, headers=CSRF) as r:
                    assert r.status == 200
            samples = await scrape(client)
        assert value(samples, "agent_bff_redis_pool_max_connections") >= 5
        idle = ("agent_bff_redis_pool_connections", frozenset({("state", "idle")}))
        in_use = ("agent_bff_redis_pool_connections", frozenset({("state", "in_use")}))
        if proc is fenced:
            assert samples[idle] >= 1 and samples[in_use] == 0  # all back in the nodes' pools
        else:
            assert idle not in samples and in_use not in samples
