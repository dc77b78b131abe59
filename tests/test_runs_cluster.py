"""Resumable runs on a real Redis Cluster (3 primaries) behind two gateway processes: every
key of a run shares one hash slot (`{<runId>}`), every key of an application's budget another
(`{<applicationId>}`), so the run scripts, the budget scripts (`BUDGET_READ`,
`BUDGET_RESERVE`, `PUBLISH_FLIGHT`) and the catch-up script (`CATCHUP_RANGE`: a cluster
client has no `WATCH`) run there as on one server; a cut stream resumes on the other replica
exactly once, live and after its end; near the budget a replica publishes its runs in flight
and withdraws them when it shuts down (SIGTERM)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from redis.crc import key_slot

from tests.gateway_process import GatewayProcess
from tests.redis_topologies import RedisClusterTopology
from tests.runs_helpers import CSRF, CountingUpstream, event_id, event_kind, read_events

pytestmark = pytest.mark.redis_server


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterTopology]:
    with RedisClusterTopology(3) as topology:
        yield topology


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[CountingUpstream, TestServer]]:
    counting = CountingUpstream(count=40, delay=0.02, burst=4)
    server = TestServer(counting.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield counting, server
    finally:
        await server.close()


def _keys(cluster: RedisClusterTopology) -> set[str]:
    return set().union(*cluster.keys_per_node().values())


async def test_a_run_resumes_across_replicas_on_a_cluster(
    tier_system: None,
    cluster: RedisClusterTopology,
    upstream: tuple[CountingUpstream, TestServer],
    tmp_path: Path,
) -> None:
    counting, server = upstream
    apps = tmp_path / "apps.toml"
    # A budget small enough that after one run the application is near it (a quarter: its
    # ended run plus the next one's assumed cost): A's next check is `BUDGET_RESERVE` and A
    # publishes its runs in flight.
    apps.write_text(
        f'[apps.shop]\nupstream = "{server.make_url("/v1")}"\nresumable = true\n'
        "resume_window_seconds = 10\nresume_redis_budget_bytes = 60000\n"
    )
    env = {
        "SESSION_STORE": "redis",
        "REDIS_URL": cluster.url,
        "APPS_FILE": str(apps),
        "RUN_HEARTBEAT_SECONDS": "0.25",
    }
    with GatewayProcess(env) as a, GatewayProcess(env) as b:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
            response = await client.post(
                f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
            )
            assert response.status == 200, await response.text()
            run_id = response.headers["X-Run-Id"]
            first = await read_events(response, 6)
            response.close()  # the browser leaves mid-way; A keeps pumping
            async with client.get(
                f"{b.url}/apps/shop/runs/{run_id}",
                headers={"Last-Event-ID": str(event_id(first[-1]))},
            ) as resumed:
                assert resumed.status == 200
                rest = await asyncio.wait_for(read_events(resumed), 20)
            events = first + rest
            assert [event_id(e) for e in events] == list(range(1, len(events) + 1))
            assert len(events) == counting.count + 1 and event_kind(events[-1]) == "done"
            # Ended: a replay from the start on B (the catch-up script), then 204 past it.
            async with client.get(f"{b.url}/apps/shop/runs/{run_id}") as again:
                assert await asyncio.wait_for(read_events(again), 20) == events
            async with client.get(
                f"{b.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": str(len(events))}
            ) as done:
                assert done.status == 204
            # A second run from A, near the budget: its check and flight field on the cluster.
            async with client.post(
                f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "again"}
            ) as second:
                assert second.status == 200 and "X-Run-Id" in second.headers
                await read_events(second)
            await asyncio.sleep(1)  # the ended runs' costs counted (every 0.25 s)
            # A published its runs in flight and withdrew them once nothing was uncounted
            # (the only `HDEL`s: the flight scripts'), on the node of the application's slot.
            node = cluster.node_for_key("agent:aux:runs:{shop}:flight")
            assert node.command_calls().get("hdel", 0) >= 1, node.command_calls()
            a.stop()  # SIGTERM: a clean shutdown withdraws whatever A still published
    keys = _keys(cluster)
    run_keys = {key for key in keys if f"{{{run_id}}}" in key}
    assert run_keys and len({key_slot(key.encode()) for key in run_keys}) == 1, run_keys
    budget_keys = {key for key in keys if "runs:{shop}:" in key}
    assert any(":bytes:" in key for key in budget_keys), budget_keys
    assert not any(key.endswith(":flight") for key in budget_keys), budget_keys
    assert len({key_slot(key.encode()) for key in budget_keys}) == 1, budget_keys
