"""One application's resume streams never starve another's (issue 17, outside attack (a)).

Two real `python -m app` replicas on a real `redis-server`, two resumable applications (`shop`,
`other`), `RUN_FOLLOW_CONNECTIONS` low. An attacker of `shop` starts runs on replica A and opens
many resume streams of them on replica B (one run, many readers; one client, many runs). A
victim of `other` then resumes its own run on B: every event arrives, in order, then the end;
never `event: error` `run_store_unavailable`. What the attacker asked beyond its caps is refused
at once with 503 `upstream_busy` (JSON, `Retry-After`), never a slow failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer
from tests.runs_helpers import CountingUpstream, error_code, event_id, event_kind, read_events

pytestmark = pytest.mark.redis_server

CSRF = {"X-CSRF": "1"}
FOLLOW_CONNECTIONS = 4  # two resumable applications: a share of 2 each


@pytest.fixture
def redis(tier_integration: None) -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def _serve(upstream: CountingUpstream, stack: AsyncExitStack) -> str:
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    stack.push_async_callback(server.close)
    return str(server.make_url("/v1"))


@pytest.fixture
async def setup(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess, CountingUpstream, CountingUpstream]]:
    # The attacker's runs last long; the victim's is short.
    attacker = CountingUpstream(count=400, delay=1.0)
    victim = CountingUpstream(count=30, delay=0.03)
    async with AsyncExitStack() as stack:
        shop, other = await _serve(attacker, stack), await _serve(victim, stack)
        apps = tmp_path / "apps.toml"
        apps.write_text(
            f'[apps.shop]\nupstream = "{shop}"\nresumable = true\n'
            "resume_window_seconds = 5\nidle_timeout_seconds = 5\n"
            f'[apps.other]\nupstream = "{other}"\nresumable = true\n'
            "resume_window_seconds = 5\nidle_timeout_seconds = 5\n"
        )
        env = {
            "SESSION_STORE": "redis",
            "REDIS_URL": redis.url,
            "APPS_FILE": str(apps),
            "RUN_HEARTBEAT_SECONDS": "0.25",
            "RUN_FOLLOW_CONNECTIONS": str(FOLLOW_CONNECTIONS),
            "RUN_FOLLOWS_PER_CLIENT": "1",
            # Clients are told apart by X-Forwarded-For (the tests all come from 127.0.0.1).
            "TRUSTED_PROXIES": "127.0.0.1/32",
        }
        with GatewayProcess(env) as a, GatewayProcess(env) as b:
            yield a, b, attacker, victim


def _client(address: str = "203.0.113.7") -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), headers={"X-Forwarded-For": address}
    )


async def _start(client: aiohttp.ClientSession, replica: GatewayProcess, app: str) -> str:
    """POST on `replica`, read two events, leave: the run id."""
    response = await client.post(
        f"{replica.url}/apps/{app}/agent/chat", headers=CSRF, json={"message": "hi"}
    )
    assert response.status == 200, await response.text()
    run_id = response.headers["X-Run-Id"]
    await read_events(response, 2)
    response.close()
    return run_id


async def _open_resumes(
    client: aiohttp.ClientSession,
    url: str,
    count: int,
    stack: AsyncExitStack,
    headers: dict[str, str] | None = None,
) -> list[int]:
    """Open `count` resume streams of `url` at once and keep the open ones open (each is read
    in the background, as a browser would): their statuses. A refusal must be a fast JSON
    503 `upstream_busy` with `Retry-After`."""

    asked_with = {"Last-Event-ID": "2", **(headers or {})}

    async def one() -> int:
        asked = time.monotonic()
        response = await client.get(url, headers=asked_with)
        if response.status == 200:
            task = asyncio.create_task(_keep_reading(client, url, asked_with, response))
            stack.callback(task.cancel)
            return 200
        body = await response.json()
        took = time.monotonic() - asked
        response.release()
        assert response.status == 503, body
        assert body["error"]["code"] == "upstream_busy", body
        assert response.headers["Retry-After"] == "1"
        assert took < 0.5, f"a refusal took {took:.2f}s"
        return 503

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _keep_reading(
    client: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    response: aiohttp.ClientResponse,
) -> None:
    """Read `response` to its end, then reconnect, as `EventSource` does, until cancelled."""
    while True:
        try:
            await read_events(response)
        finally:
            response.close()
        await asyncio.sleep(0.05)
        response = await client.get(url, headers=headers)


async def _victim_reads_its_whole_run(
    a: GatewayProcess, b: GatewayProcess, victim: CountingUpstream
) -> None:
    async with _client("198.51.100.9") as client:
        run_id = await _start(client, a, "other")
        async with client.get(
            f"{b.url}/apps/other/runs/{run_id}", headers={"Last-Event-ID": "2"}
        ) as resumed:
            assert resumed.status == 200, await resumed.text()
            rest = await asyncio.wait_for(read_events(resumed), 15)
    assert [error_code(e) for e in rest if error_code(e)] == []
    assert [event_id(e) for e in rest] == list(range(3, victim.count + 2))
    assert event_kind(rest[-1]) == "done"


async def test_many_resumes_of_one_run_never_starve_another_application(
    setup: tuple[GatewayProcess, GatewayProcess, CountingUpstream, CountingUpstream],
) -> None:
    a, b, _, victim = setup
    async with _client() as attacker, AsyncExitStack() as stack:
        run_id = await _start(attacker, a, "shop")
        statuses = await _open_resumes(
            attacker, f"{b.url}/apps/shop/runs/{run_id}", 10 * FOLLOW_CONNECTIONS, stack
        )
        assert 200 in statuses  # the run is readable ...
        assert 503 in statuses  # ... by a bounded number of readers
        await asyncio.sleep(0.5)  # the attacker's readers are blocked in Redis now
        await _victim_reads_its_whole_run(a, b, victim)


async def test_one_client_following_many_runs_never_starves_another_application(
    setup: tuple[GatewayProcess, GatewayProcess, CountingUpstream, CountingUpstream],
) -> None:
    a, b, _, victim = setup
    async with _client() as attacker, AsyncExitStack() as stack:
        run_ids = [await _start(attacker, a, "shop")]  # the session first, then at once
        run_ids += await asyncio.gather(
            *(_start(attacker, a, "shop") for _ in range(2 * FOLLOW_CONNECTIONS - 1))
        )
        statuses: list[int] = []
        for index, run_id in enumerate(run_ids):
            # Each run followed for another address: the application's share is the limit.
            address = {"X-Forwarded-For": f"203.0.113.{10 + index}"}
            statuses += await _open_resumes(
                attacker, f"{b.url}/apps/shop/runs/{run_id}", 4, stack, address
            )
        assert 200 in statuses and 503 in statuses
        await asyncio.sleep(0.5)
        await _victim_reads_its_whole_run(a, b, victim)


async def test_one_client_following_many_runs_leaves_its_application_to_other_clients(
    setup: tuple[GatewayProcess, GatewayProcess, CountingUpstream, CountingUpstream],
) -> None:
    a, b, _, _ = setup
    async with _client() as attacker, _client("198.51.100.9") as other, AsyncExitStack() as s:
        run_ids = [await _start(attacker, a, "shop") for _ in range(2)]
        first = await _open_resumes(attacker, f"{b.url}/apps/shop/runs/{run_ids[0]}", 1, s)
        second = await _open_resumes(attacker, f"{b.url}/apps/shop/runs/{run_ids[1]}", 1, s)
        assert (first, second) == ([200], [503])  # RUN_FOLLOWS_PER_CLIENT=1
        # Another client of the same application still follows a run of its own.
        run_id = await _start(other, a, "shop")
        async with other.get(
            f"{b.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "2"}
        ) as resumed:
            assert resumed.status == 200, await resumed.text()
            events = await asyncio.wait_for(read_events(resumed, 2), 10)
        assert [event_id(e) for e in events] == [3, 4]
