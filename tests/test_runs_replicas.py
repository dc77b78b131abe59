"""Resumable runs across two real `python -m app` replicas on a real `redis-server`: a cut
stream resumed on the other replica gets every event exactly once, in order; `stop` on one
replica ends a run pumped by the other; a SIGKILLed pumper is reported, never a hang; a
session cannot read another's run; a draining replica keeps pumping."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer
from tests.runs_helpers import (
    CountingUpstream,
    error_code,
    event_id,
    event_kind,
    event_n,
    read_events,
)

pytestmark = pytest.mark.redis_server

CSRF = {"X-CSRF": "1"}
HEARTBEAT = 0.25


@pytest.fixture
async def counting() -> AsyncIterator[tuple[CountingUpstream, TestServer]]:
    upstream = CountingUpstream(count=60, delay=0.03)
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield upstream, server
    finally:
        await server.close()


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def _replicas(
    tmp_path: Path, redis: RedisServer, upstream_url: str, **extra: str
) -> tuple[GatewayProcess, GatewayProcess]:
    apps = tmp_path / "apps.toml"
    apps.write_text(
        f'[apps.shop]\nupstream = "{upstream_url}"\nresumable = true\n'
        "resume_window_seconds = 5\nidle_timeout_seconds = 5\n"
    )
    env = {
        "SESSION_STORE": "redis",
        "REDIS_URL": redis.url,
        "APPS_FILE": str(apps),
        "RUN_HEARTBEAT_SECONDS": str(HEARTBEAT),
        **extra,
    }
    return GatewayProcess(env), GatewayProcess(env)


@pytest.fixture
async def two(
    tier_system: None,
    tmp_path: Path,
    redis: RedisServer,
    counting: tuple[CountingUpstream, TestServer],
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess]]:
    a, b = _replicas(tmp_path, redis, str(counting[1].make_url("/v1")))
    with a, b:
        yield a, b


def _client() -> aiohttp.ClientSession:
    # Cookies are per host, not per port: both replicas see the same session.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def _start(
    client: aiohttp.ClientSession, replica: GatewayProcess, read: int
) -> tuple[str, list[bytes]]:
    """POST on `replica`, read `read` events, drop the connection: (run id, events)."""
    response = await client.post(
        f"{replica.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
    )
    assert response.status == 200, await response.text()
    run_id = response.headers["X-Run-Id"]
    events = await read_events(response, read)
    response.close()  # the browser leaves mid-way
    return run_id, events


async def test_a_stream_cut_on_one_replica_resumes_on_the_other_exactly_once(
    two: tuple[GatewayProcess, GatewayProcess], counting: tuple[CountingUpstream, TestServer]
) -> None:
    a, b = two
    upstream = counting[0]
    upstream.burst = 5  # several events per Redis entry: the cut (7) is inside one
    async with _client() as client:
        run_id, first = await _start(client, a, 7)
        assert [event_id(e) for e in first] == list(range(1, 8))
        last = event_id(first[-1])
        async with client.get(
            f"{b.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": str(last)}
        ) as resumed:
            assert resumed.status == 200
            assert resumed.headers["Content-Type"].startswith("text/event-stream")
            rest = await asyncio.wait_for(read_events(resumed), 10)
        jar_cookies = {cookie.key: cookie.value for cookie in client.cookie_jar}
    events = first + rest
    assert [event_id(e) for e in events] == list(range(1, len(events) + 1))
    assert [event_n(e) for e in events[:-1]] == list(range(upstream.count))
    assert event_kind(events[-1]) == "done"
    # Exactly the upstream's fields (its own id line included), then the gateway's id.
    for index, event in enumerate(events[:-1]):
        assert event + b"\n\n" == CountingUpstream.event(index).replace(
            b"\n\n", f"\nid: {index + 1}\n\n".encode()
        )
    assert upstream.finished.is_set() and not upstream.cancelled.is_set()
    assert upstream.started == 1
    # Ended: on the pumping replica too (its own copy is dropped once Redis has the end), the
    # run is read from Redis: from the start it is the same events; past its end, 204.
    async with _client() as client:
        client.cookie_jar.update_cookies(jar_cookies)
        async with client.get(f"{a.url}/apps/shop/runs/{run_id}") as again:
            assert await asyncio.wait_for(read_events(again), 10) == events
        async with client.get(
            f"{a.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": str(len(events))}
        ) as done:
            assert done.status == 204


async def test_a_resume_follows_live_events_from_the_other_replica(
    two: tuple[GatewayProcess, GatewayProcess], counting: tuple[CountingUpstream, TestServer]
) -> None:
    a, b = two
    upstream = counting[0]
    upstream.delay = 0.05
    async with _client() as client:
        run_id, first = await _start(client, a, 2)
        # `?last_event_id=` works as the header does; the run is still being pumped by A.
        async with client.get(
            f"{b.url}/apps/shop/runs/{run_id}?last_event_id={event_id(first[-1])}"
        ) as resumed:
            rest = await asyncio.wait_for(read_events(resumed), 10)
        assert not upstream.finished.is_set() or len(rest) > 0
    ids = [event_id(e) for e in first + rest]
    assert ids == list(range(1, upstream.count + 2))


async def test_another_session_cannot_read_or_stop_a_run(
    two: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, b = two
    async with _client() as owner, _client() as other:
        run_id, _ = await _start(owner, a, 1)
        # Another session (it has its own conversation): 404 on both replicas.
        async with other.post(
            f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "mine"}
        ) as own:
            await own.read()
        for replica in (a, b):
            async with other.get(f"{replica.url}/apps/shop/runs/{run_id}") as response:
                assert response.status == 404
                assert (await response.json())["error"]["code"] == "run_not_found"
            async with other.post(
                f"{replica.url}/apps/shop/runs/{run_id}/stop", headers=CSRF
            ) as response:
                assert response.status == 404
        # No session at all: 404 too; the owner still reads it.
        async with (
            aiohttp.ClientSession() as anonymous,
            anonymous.get(f"{b.url}/apps/shop/runs/{run_id}") as response,
        ):
            assert response.status == 404
        async with owner.get(f"{b.url}/apps/shop/runs/{run_id}") as response:
            assert response.status == 200


async def test_stop_on_one_replica_ends_a_run_pumped_by_the_other_within_a_second(
    two: tuple[GatewayProcess, GatewayProcess], counting: tuple[CountingUpstream, TestServer]
) -> None:
    a, b = two
    upstream = counting[0]
    upstream.count, upstream.delay = 10_000, 0.02
    async with _client() as client:
        run_id, _ = await _start(client, a, 2)
        reader = await client.get(f"{b.url}/apps/shop/runs/{run_id}")
        async with client.post(f"{b.url}/apps/shop/runs/{run_id}/stop") as refused:
            assert refused.status == 403  # CSRF header missing
        asked = time.monotonic()
        async with client.post(f"{b.url}/apps/shop/runs/{run_id}/stop", headers=CSRF) as stop:
            assert stop.status == 202
            assert (await stop.json())["run"] == {"id": run_id, "state": "stopping"}
        await asyncio.wait_for(upstream.cancelled.wait(), 3)
        took = time.monotonic() - asked
        events = await asyncio.wait_for(read_events(reader), 5)
        reader.close()
    assert took < 1.2, f"the upstream was cancelled {took:.2f}s after the stop"
    assert error_code(events[-1]) == "run_stopped"
    assert not upstream.finished.is_set()


async def test_sigkill_of_the_pumping_replica_gives_the_reader_an_error_not_a_hang(
    two: tuple[GatewayProcess, GatewayProcess], counting: tuple[CountingUpstream, TestServer]
) -> None:
    a, b = two
    upstream = counting[0]
    upstream.count, upstream.delay = 10_000, 0.02
    async with _client() as client:
        run_id, _ = await _start(client, a, 2)
        async with client.get(f"{b.url}/apps/shop/runs/{run_id}") as reader:
            await read_events(reader, 5)
            a.signal(signal.SIGKILL)
            killed = time.monotonic()
            events = await asyncio.wait_for(read_events(reader), 10)
            took = time.monotonic() - killed
    bound = HEARTBEAT * 4 + HEARTBEAT * 2
    assert error_code(events[-1]) == "run_orphaned"
    assert took < bound + 1.0, f"the reader learnt it after {took:.2f}s"
    ids = [event_id(e) for e in events[:-1]]
    assert ids == list(range(ids[0], ids[0] + len(ids))) if ids else True
    payload = json.loads(events[-1].split(b"data: ", 1)[1])
    assert "gone" in payload["message"]


async def test_a_draining_replica_keeps_pumping_its_runs(
    two: tuple[GatewayProcess, GatewayProcess], counting: tuple[CountingUpstream, TestServer]
) -> None:
    a, b = two
    upstream = counting[0]
    upstream.count, upstream.delay = 40, 0.03  # ~1.2 s, under SHUTDOWN_TIMEOUT_SECONDS (3)
    async with _client() as client:
        run_id, first = await _start(client, a, 2)
        a.signal(signal.SIGTERM)
        async with client.get(
            f"{b.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "2"}
        ) as reader:
            rest = await asyncio.wait_for(read_events(reader), 10)
    assert [event_id(e) for e in first + rest] == list(range(1, upstream.count + 2))
    assert event_kind(rest[-1]) == "done"
    assert a.wait(10) == 0


async def test_a_resume_ahead_of_redis_on_a_live_run_gets_the_rest_not_a_400(
    two: tuple[GatewayProcess, GatewayProcess], counting: tuple[CountingUpstream, TestServer]
) -> None:
    """A live run's events reach its browser before Redis, so a browser resuming at once on
    another replica may name an id Redis does not hold yet: it gets what follows that id and
    the end (this raced in test_a_draining_replica_keeps_pumping_its_runs: 400, no events).
    Only an ended run's last id is final."""
    a, b = two
    upstream = counting[0]
    upstream.count, upstream.delay = 12, 0.1
    async with _client() as client:
        run_id, _ = await _start(client, a, 2)
        ahead = 5  # not sent by the upstream yet, let alone stored
        async with client.get(
            f"{b.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": str(ahead)}
        ) as reader:
            assert reader.status == 200, await reader.text()
            rest = await asyncio.wait_for(read_events(reader), 10)
        assert [event_id(e) for e in rest] == list(range(ahead + 1, upstream.count + 2))
        assert event_kind(rest[-1]) == "done"
        # Ended: an id past its last event is refused.
        async with client.get(
            f"{b.url}/apps/shop/runs/{run_id}",
            headers={"Last-Event-ID": str(upstream.count + 2)},
        ) as past:
            assert past.status == 400


async def test_redis_dying_mid_run_ends_it_with_a_clear_error_and_cancels_the_upstream(
    two: tuple[GatewayProcess, GatewayProcess],
    counting: tuple[CountingUpstream, TestServer],
    redis: RedisServer,
) -> None:
    a, _ = two
    upstream = counting[0]
    upstream.count, upstream.delay = 10_000, 0.02
    async with _client() as client:
        response = await client.post(
            f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
        )
        await read_events(response, 3)
        redis.kill()
        killed = time.monotonic()
        events = await asyncio.wait_for(read_events(response), 10)
        took = time.monotonic() - killed
        response.close()
    assert error_code(events[-1]) == "run_store_unavailable"
    ids = [event_id(e) for e in events]
    assert ids == list(range(4, 4 + len(ids)))  # in order, nothing skipped, up to the error
    await asyncio.wait_for(upstream.cancelled.wait(), 5)
    assert took < 5, took  # REDIS_OP_TIMEOUT_SECONDS=1 in the test processes


async def test_readers_of_one_run_at_different_positions_share_one_follower(
    two: tuple[GatewayProcess, GatewayProcess], counting: tuple[CountingUpstream, TestServer]
) -> None:
    """All readers of a run on a replica share one blocking reader (one follow connection);
    one from further back replays from Redis first; each gets every event once, in order."""
    a, b = two
    upstream = counting[0]
    total = upstream.count + 1
    async with _client() as client:
        run_id, _ = await _start(client, a, 20)
        url = f"{b.url}/apps/shop/runs/{run_id}"
        late = await client.get(url, headers={"Last-Event-ID": "20"})
        head = await read_events(late, 3)
        early = await client.get(url)  # from the start: behind what the follower holds
        async with client.get(f"{b.url}/metrics") as metrics:
            text = await metrics.text()
        assert 'agent_bff_runs_followed{application="shop"} 1.0' in text
        rest = await asyncio.wait_for(read_events(late), 10)
        whole = await asyncio.wait_for(read_events(early), 10)
        late.close()
        early.close()
    assert [event_id(e) for e in head + rest] == list(range(21, total + 1))
    assert [event_id(e) for e in whole] == list(range(1, total + 1))
    assert event_kind(whole[-1]) == "done"
