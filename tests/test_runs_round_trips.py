"""The Redis commands a resumable run costs the gateway, counted by redis-server (`INFO
commandstats`) through HTTP: the budget's read and count shared by runs
(app/runs/budget.py `BudgetLedger`), one `XADD NOMKSTREAM` per write into the stream the run
was created with (app/runs/store.py `CREATE_RUN`, `append`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer

from app.runs.costs import RUN_OVERHEAD_BYTES
from tests.fake_upstream import app_settings, run_gateway
from tests.redis_server import RedisServer, command_calls
from tests.runs_helpers import CSRF, CountingUpstream, read_events


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    server = TestServer(CountingUpstream(count=5, delay=0).app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


async def test_runs_in_a_row_read_the_budget_once_per_refresh_and_count_together(
    shared_redis: RedisServer, upstream: TestServer
) -> None:
    """Before the ledger each run read the counters (`MGET`, now `BUDGET_READ`) at its start
    and added its cost (`INCRBY` + `PEXPIRE`) at its end: 10 runs, 10 reads and 10 `INCRBY`s."""
    env = {
        "SESSION_STORE": "redis",
        "REDIS_URL": shared_redis.url,
        "RUN_BUDGET_REFRESH_SECONDS": "2",
    }
    settings = app_settings(upstream.make_url("/v1"), env, resumable=True)
    client = shared_redis.client()
    async with run_gateway(settings) as gw:
        client.config_resetstat()
        started = time.monotonic()
        for _ in range(10):
            async with gw.client.post(
                "/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
            ) as response:
                assert response.status == 200 and "X-Run-Id" in response.headers
                await read_events(response)
        took = time.monotonic() - started
        calls = command_calls(client)
        # One read (BUDGET_READ, the only script of a run far from its budget that asks
        # Redis's `TIME`) per 2 s (plus one if the runs straddled a refresh).
        assert 1 <= calls.get("time", 0) <= 1 + int(took // 2), (calls, took)
        assert calls.get("incrby", 0) <= int(took // 2) + 1, calls
        deadline = time.monotonic() + 5
        while not client.keys(f"{settings.redis_aux_prefix}runs:{{shop}}:bytes:*"):
            assert time.monotonic() < deadline, "the runs' bytes never reached Redis"
            await asyncio.sleep(0.05)
        (key,) = client.keys(f"{settings.redis_aux_prefix}runs:{{shop}}:bytes:*")
        assert int(client.get(key) or 0) >= 10 * RUN_OVERHEAD_BYTES
        assert client.pttl(key) > 0


async def test_a_trickling_run_writes_each_group_in_one_command(
    shared_redis: RedisServer,
) -> None:
    """30 events 10 ms apart: one write each. Before, every write was `XADD` + `PEXPIRE`
    (31 `PEXPIRE`s); now the run is created with its empty stream and its TTL, and each write
    is `XADD NOMKSTREAM` alone (a stream lost meanwhile is written again with its TTL:
    tests/test_runs_budget_attacks2.py, a stream recreated after a Redis restart)."""
    upstream = CountingUpstream(count=30, delay=0.01)
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    env = {"SESSION_STORE": "redis", "REDIS_URL": shared_redis.url, "RUN_HEARTBEAT_SECONDS": "5"}
    settings = app_settings(server.make_url("/v1"), env, resumable=True)
    client = shared_redis.client()
    try:
        async with run_gateway(settings) as gw:
            client.config_resetstat()
            async with gw.client.post(
                "/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
            ) as response:
                run_id = response.headers["X-Run-Id"]
                events = await read_events(response)
            calls = command_calls(client)
    finally:
        await server.close()
    assert len(events) == 31  # 30 and the upstream's end event
    assert calls.get("xadd", 0) >= 20, calls  # the events came one by one
    # The creation's two and the end's two (in their scripts: `pexpire` counts those too).
    assert calls.get("pexpire", 0) <= 4, calls
    key = f"{settings.redis_aux_prefix}run:{{{run_id}}}:e"
    assert 0 < client.pttl(key) <= 5_000 + 4 * 5_000 + 60_000
