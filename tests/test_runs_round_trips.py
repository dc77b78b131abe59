"""The Redis commands a resumable run costs the gateway, counted by redis-server (`INFO
commandstats`) through HTTP: the budget's read and count shared by runs
(app/runs/budget.py `BudgetLedger`), one `XADD NOMKSTREAM` per write into the stream the run
was created with (app/runs/store.py `CREATE_RUN`, `append`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from app.config import Settings
from app.keys import RUNS_KEY
from app.runs.costs import RUN_OVERHEAD_BYTES
from app.runs.store import RunMeta
from tests.fake_upstream import app_settings, run_gateway
from tests.redis_server import RedisServer, command_calls
from tests.runs_helpers import (
    CSRF,
    WHOLE_EVENTS,
    CountingUpstream,
    WholeUpstream,
    event_id,
    read_events,
    run_stores,
)


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


async def _whole_run(
    shared_redis: RedisServer, upstream: WholeUpstream
) -> tuple[str, bytes, dict[str, int], list[bytes], Settings, dict[str, Any]]:
    """One run of `upstream` through a gateway on `shared_redis`: (run id, first response's
    body, Redis commands it cost, a resume after event 2, the settings, what was observed
    after it: metrics, the stop's answer, a resume from the last event)."""
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    env = {"SESSION_STORE": "redis", "REDIS_URL": shared_redis.url, "RUN_HEARTBEAT_SECONDS": "5"}
    settings = app_settings(server.make_url("/v1"), env, resumable=True)
    client = shared_redis.client()
    seen: dict[str, Any] = {}
    try:
        async with run_gateway(settings) as gw:
            client.config_resetstat()
            async with gw.client.post(
                "/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
            ) as response:
                assert response.status == 200
                run_id = response.headers["X-Run-Id"]
                body = await response.read()
            calls = command_calls(client)
            url = f"/apps/shop/runs/{run_id}"
            async with gw.client.get(url, headers={"Last-Event-ID": "2"}) as resumed:
                assert resumed.status == 200
                resume = await read_events(resumed)
            async with gw.client.get(url, headers={"Last-Event-ID": str(WHOLE_EVENTS + 1)}) as last:
                seen["resume_at_end"] = last.status
            async with gw.client.post(url + "/stop", headers=CSRF) as stopped:
                seen["stop"] = (stopped.status, await stopped.json())
            async with gw.client.get("/metrics") as metrics:
                seen["metrics"] = await metrics.text()
            seen["in_process"] = run_id in gw.app[RUNS_KEY].runs
    finally:
        await server.close()
    seen["ttls"] = {
        kind: client.pttl(f"{settings.redis_aux_prefix}run:{{{run_id}}}:{kind}") for kind in "mehz"
    }
    return run_id, body, calls, resume, settings, seen


async def test_a_run_whose_whole_answer_has_arrived_is_created_ended_in_one_command(
    shared_redis: RedisServer,
) -> None:
    """The answer was all there when the run started: one script (`CREATE_ENDED`) creates the
    run with its events and its end, instead of `CREATE_RUN`, then the pump's `END_RUN`; the
    browser, a resume, a stop see the run as the pump's way makes it."""
    run_id, body, calls, resume, settings, seen = await _whole_run(shared_redis, WholeUpstream())
    events = body.split(b"\n\n")[:-1]
    assert len(events) == WHOLE_EVENTS + 1
    assert [event_id(e) for e in events] == list(range(1, WHOLE_EVENTS + 2))
    assert events[0] == CountingUpstream.event(0)[:-2] + b"\nid: 1"  # the gateway's id last
    # One script with one XADD and one HSET: no empty stream made first, no end written after.
    assert calls.get("exists") == 1 and calls.get("hset") == 1, calls
    assert "xgroup|create" not in calls and calls.get("xadd") == 1, calls
    assert "agent_bff_runs_created_ended_total 1.0" in seen["metrics"]
    assert "agent_bff_runs_started_total 1.0" in seen["metrics"]
    assert not seen["in_process"]  # read from Redis from now on
    assert [event_id(e) for e in resume] == list(range(3, WHOLE_EVENTS + 2))
    assert resume == [e for e in events if event_id(e) > 2]
    assert seen["resume_at_end"] == 204
    assert seen["stop"] == (202, {"run": {"id": run_id, "state": "ended"}})
    ttls = seen["ttls"]
    window_ms = round(settings.apps["shop"].resume_window_seconds * 1000)
    assert 0 < ttls["m"] <= window_ms and 0 < ttls["e"] <= window_ms, ttls
    assert 0 < ttls["z"] <= window_ms and ttls["h"] == -2, ttls  # no heartbeat: it ended


async def test_a_run_created_ended_is_the_run_the_pump_would_have_made(
    shared_redis: RedisServer,
) -> None:
    """The same answer sent event by event (pumped): the same first response, the same
    resume, the same Redis keys but the heartbeat."""
    whole = await _whole_run(shared_redis, WholeUpstream())
    pumped = await _whole_run(shared_redis, WholeUpstream(delay=0.01))
    assert "agent_bff_runs_created_ended_total 1.0" in whole[5]["metrics"]
    assert "agent_bff_runs_created_ended_total 0.0" in pumped[5]["metrics"]
    assert whole[1] == pumped[1] and whole[3] == pumped[3]
    assert whole[5]["stop"][1]["run"]["state"] == pumped[5]["stop"][1]["run"]["state"]
    assert whole[5]["resume_at_end"] == pumped[5]["resume_at_end"] == 204


async def test_a_whole_answer_ending_in_an_unfinished_event_is_pumped(
    shared_redis: RedisServer,
) -> None:
    """Bytes after the last blank line (an event never finished): the pump's way decides
    what becomes of them, as before (no run is created ended)."""
    tail = b"data: never finished"
    whole = await _whole_run(shared_redis, WholeUpstream(tail=tail))
    assert "agent_bff_runs_created_ended_total 0.0" in whole[5]["metrics"]
    assert "xgroup|create" in whole[2]
    assert len(whole[1].split(b"\n\n")[:-1]) == WHOLE_EVENTS + 1


async def test_creating_a_run_ended_again_after_a_lost_reply_writes_nothing_twice(
    shared_redis: RedisServer,
) -> None:
    """A retry of `CREATE_ENDED` (its reply lost, the backend sends it again) finds the run
    and succeeds without a second entry (an `XADD` at the same id would be refused: the
    answer then relayed without resume while its run stays in Redis, uncounted)."""
    framed = b"data: a\nid: 1\n\ndata: b\nid: 2\n\n"
    async with run_stores(shared_redis, 1) as (store,):
        for _ in range(2):
            await store.create_ended(
                "r" * 22, RunMeta("owner", "shop"), framed, 2, reason="done", ttl_ms=60_000
            )
        meta = await store.meta("r" * 22)
        read = await store.range_after("r" * 22, 0, 16, app_id="shop", client="c")
    assert meta == RunMeta("owner", "shop", "done", 2)
    assert [(entry.first, entry.seq, entry.end) for entry in read] == [(1, 2, "done")]
    with contextlib.closing(shared_redis.client()) as client:
        assert client.xlen("t:run:{" + "r" * 22 + "}:e") == 1
