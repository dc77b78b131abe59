"""F3 (attack-runs): one anonymous client of application A (whose upstream it controls) ends
run after run of ~3.5 MiB (each under the default resume_max_bytes, kept in Redis for the
window, created at the client's own rate). Without a per-application budget of run data in
Redis (`resume_redis_budget_bytes`, app/runs/store.py) they fill Redis, and application B's new
users get 503 `session_store_full`. Two real replicas, a real redis-server at maxmemory 96mb."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer
from tests.runs_helpers import (
    CountingUpstream,
    SseUpstream,
    error_code,
    event_id,
    read_events,
    redis_at,
    redis_runs_env,
    start_upstreams,
)

pytestmark = pytest.mark.redis_server

CSRF = {"X-CSRF": "1"}


class BigRunUpstream(SseUpstream):
    """App A's (hostile) upstream: 7 events of 512 KiB at once (3.5 MiB, under the default
    resume_max_bytes of 4 MiB), then the end."""

    async def write_events(self, response: web.StreamResponse) -> None:
        await response.write((b"data: " + b"y" * (512 * 1024) + b"\n\n") * 7)


@pytest.fixture
def redis(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("96mb", "noeviction") as server:
        yield server


@pytest.fixture
async def setup(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess, CountingUpstream, RedisServer]]:
    victim = CountingUpstream(count=30, delay=0.03)
    async with AsyncExitStack() as stack:
        urls = await start_upstreams(stack, BigRunUpstream().app(), victim.app())
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{urls[0]}"\nresumable = true\n'
            "resume_window_seconds = 30\n"
            f'[apps.other]\nupstream = "{urls[1]}"\nresumable = true\n'
            "resume_window_seconds = 30\n",
        )
        with GatewayProcess(env) as a, GatewayProcess(env) as b:
            yield a, b, victim, redis


async def test_one_clients_ended_runs_never_fill_redis_for_another_application(
    setup: tuple[GatewayProcess, GatewayProcess, CountingUpstream, RedisServer],
) -> None:
    a, b, victim, redis = setup
    statuses: list[int] = []
    resumable = 0
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as attacker:
        started = time.monotonic()
        for _ in range(40):  # 40 x 3.5 MiB, one at a time, one address, one session
            response = await attacker.post(
                f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
            )
            statuses.append(response.status)
            resumable += "X-Run-Id" in response.headers
            await response.read()
        took = time.monotonic() - started
    # The default budget (64 MiB) is reached after 14 such runs (each counted as the ~4.7 MiB
    # Redis needs for it: app/runs/budget.py); later ones are relayed.
    assert statuses == [200] * 40
    assert 10 <= resumable <= 16, resumable
    used = int(redis.client().info("memory")["used_memory"])
    assert used < 90 * 1024 * 1024, (
        f"{resumable} runs kept; Redis holds {used / 2**20:.1f} MiB of 96 after the attack"
    )
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as user:
        response = await user.post(
            f"{b.url}/apps/other/agent/chat", headers=CSRF, json={"message": "hi"}
        )
        body = await response.read()
        assert response.status == 200 and "X-Run-Id" in response.headers, (
            f"after one client's 40 runs of app shop in {took:.1f} s (statuses "
            f"{sorted(set(statuses))}), app other's new user got {response.status} "
            f"{body[:120]!r}, X-Run-Id {'X-Run-Id' in response.headers}"
        )
        run_id = response.headers["X-Run-Id"]
        async with user.get(f"{a.url}/apps/other/runs/{run_id}") as resumed:
            assert resumed.status == 200
            events = await asyncio.wait_for(read_events(resumed), 15)
    assert [error_code(e) for e in events if error_code(e)] == []
    assert [event_id(e) for e in events] == list(range(1, victim.count + 2))


async def test_the_budget_counts_what_redis_needs_for_a_run_not_its_framed_bytes(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """One replica, a budget of 11 MiB, runs of 3.5 MiB one after the other (each recorded
    before the next): each costs Redis ~4.7 MiB, and a run starts only while its application's
    typical run still fits, so exactly 2 are kept. Counted as framed bytes (3 x 3.5 < 11) a
    3rd would be.
    (Runs not recorded yet: test_runs_memory::test_a_run_not_recorded_yet_counts_in_the_budget.)"""
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, BigRunUpstream().app())
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{url}"\nresumable = true\nresume_window_seconds = 30\n'
            f"resume_redis_budget_bytes = {11 * 1024 * 1024}\n",
        )
        with GatewayProcess(env) as gateway:
            kept = []
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
                for _ in range(8):
                    async with client.post(
                        f"{gateway.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
                    ) as response:
                        assert response.status == 200
                        kept.append("X-Run-Id" in response.headers)
                        await response.read()
                    await asyncio.sleep(0.5)  # its end recorded (and counted) in Redis
    assert kept == [True] * 2 + [False] * 6
