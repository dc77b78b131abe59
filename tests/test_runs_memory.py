"""Resumable runs in one process (memory store), through HTTP: the first response, resume
after a disconnect, the window, the limits, stop, capacity slots, the store failing at start,
metrics. (Two replicas on Redis: tests/test_runs_replicas.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from app.applications import parse_rate_limit
from app.keys import RUNS_KEY, UPSTREAM_KEY
from app.proxy.headers import PROXIED_CSP
from app.runs.costs import run_cost
from app.runs.entries import ENTRY_BYTES
from app.runs.log import RunLog
from app.runs.sse import SseParser
from app.runs.store import RedisRunStore
from app.sessions.backend import StoreUnavailable
from tests.fake_upstream import RunningGateway, app_settings, run_gateway
from tests.runs_helpers import (
    CountingUpstream,
    WholeUpstream,
    error_code,
    event_id,
    event_kind,
    event_n,
    read_events,
)

CSRF = {"X-CSRF": "1"}
CHAT = "/apps/shop/agent/chat"
HEARTBEAT = "0.1"


@pytest.fixture
async def counting() -> AsyncIterator[tuple[CountingUpstream, TestServer]]:
    upstream = CountingUpstream(count=30, delay=0.005)
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield upstream, server
    finally:
        await server.close()


def _gateway(server: TestServer, env: dict[str, str] | None = None, **fields: Any) -> Any:
    fields.setdefault("resumable", True)
    fields.setdefault("resume_window_seconds", 5.0)
    return run_gateway(
        app_settings(
            server.make_url("/v1"), {"RUN_HEARTBEAT_SECONDS": HEARTBEAT, **(env or {})}, **fields
        )
    )


async def _start(gw: RunningGateway, read: int) -> tuple[str, list[bytes]]:
    response = await gw.client.post(CHAT, headers=CSRF, json={"message": "hi"})
    assert response.status == 200, await response.text()
    run_id = response.headers["X-Run-Id"]
    events = await read_events(response, read)
    response.close()
    return run_id, events


async def _wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_resume_after_a_disconnect_gets_every_event_once_and_the_upstream_goes_on(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    upstream, server = counting
    async with _gateway(server) as gw:
        run_id, first = await _start(gw, 4)
        assert [event_id(e) for e in first] == [1, 2, 3, 4]
        async with gw.client.get(
            f"/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "4"}
        ) as resumed:
            assert resumed.status == 200
            assert resumed.headers["X-Run-Id"] == run_id
            assert resumed.headers["Cache-Control"] == "no-cache"
            rest = await asyncio.wait_for(read_events(resumed), 5)
        events = first + rest
        assert [event_id(e) for e in events] == list(range(1, upstream.count + 2))
        assert [event_n(e) for e in events[:-1]] == list(range(upstream.count))
        assert event_kind(events[-1]) == "done"
        assert upstream.finished.is_set() and not upstream.cancelled.is_set()
        # Ended, nothing after the last id: 204 (EventSource stops reconnecting).
        async with gw.client.get(
            f"/apps/shop/runs/{run_id}", headers={"Last-Event-ID": str(len(events))}
        ) as done:
            assert done.status == 204
        # From the start (no id): the whole run again.
        async with gw.client.get(f"/apps/shop/runs/{run_id}") as again:
            assert [event_id(e) for e in await read_events(again)] == list(
                range(1, upstream.count + 2)
            )
        for bad, status in (("x1", 400), ("-1", 400), ("999", 400)):
            async with gw.client.get(
                f"/apps/shop/runs/{run_id}", headers={"Last-Event-ID": bad}
            ) as response:
                assert response.status == status
                assert (await response.json())["error"]["code"] == "invalid_last_event_id"
        async with gw.client.get("/apps/shop/runs/not-a-run") as response:
            assert response.status == 404


async def test_a_run_nobody_reads_within_its_window_is_cancelled(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    upstream, server = counting
    upstream.count = 10_000
    async with _gateway(server, resume_window_seconds=0.2) as gw:
        started = time.monotonic()
        run_id, _ = await _start(gw, 1)
        await asyncio.wait_for(upstream.cancelled.wait(), 5)
        took = time.monotonic() - started
        registry = gw.app[RUNS_KEY]
        assert registry.counters.expired == 1
        assert registry.runs[run_id].log.end == "run_expired"
        async with gw.client.get(f"/apps/shop/runs/{run_id}?last_event_id=1") as late:
            events = await read_events(late)
        assert error_code(events[-1]) == "run_expired"
    assert 0.2 <= took < 2.0


async def test_a_reader_keeps_the_run_alive_past_the_window(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    upstream, server = counting
    upstream.count, upstream.delay = 60, 0.01  # 0.6 s, three windows
    async with (
        _gateway(server, resume_window_seconds=0.2) as gw,
        gw.client.post(CHAT, headers=CSRF, json={"message": "hi"}) as response,
    ):
        events = await asyncio.wait_for(read_events(response), 5)
    assert event_kind(events[-1]) == "done"
    assert not upstream.cancelled.is_set()


async def test_a_resume_from_before_the_trimmed_events_gets_a_clear_error(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    upstream, server = counting
    async with _gateway(server, resume_max_events=5) as gw:
        # Read to the end (a reader is attached all along: the run is not cut).
        async with gw.client.post(CHAT, headers=CSRF, json={"message": "hi"}) as first:
            run_id = first.headers["X-Run-Id"]
            assert len(await read_events(first)) == upstream.count + 1
        async with gw.client.get(
            f"/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "1"}
        ) as response:
            events = await read_events(response)
        assert [error_code(e) for e in events] == ["resume_too_old"]
        # From within what is kept: fine.
        last = upstream.count + 1
        async with gw.client.get(
            f"/apps/shop/runs/{run_id}", headers={"Last-Event-ID": str(last - 3)}
        ) as response:
            assert [event_id(e) for e in await read_events(response)] == [
                last - 2,
                last - 1,
                last,
            ]


async def test_a_run_nobody_reads_is_cut_once_its_limits_drop_what_the_reader_missed(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    upstream, server = counting
    upstream.count = 10_000
    async with _gateway(server, resume_max_events=5) as gw:
        run_id, _ = await _start(gw, 1)
        await asyncio.wait_for(upstream.cancelled.wait(), 5)
        assert gw.app[RUNS_KEY].runs[run_id].log.end == "run_limit_reached"


async def test_stop_cancels_the_upstream_and_tells_the_readers(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    upstream, server = counting
    upstream.count = 10_000
    async with _gateway(server) as gw:
        async with gw.client.post(CHAT, headers=CSRF, json={"message": "hi"}) as response:
            run_id = response.headers["X-Run-Id"]
            await read_events(response, 2)
            async with gw.client.post(f"/apps/shop/runs/{run_id}/stop") as refused:
                assert refused.status == 403
            async with gw.client.post(f"/apps/shop/runs/{run_id}/stop", headers=CSRF) as stop:
                assert stop.status == 202
            events = await asyncio.wait_for(read_events(response), 5)
        assert error_code(events[-1]) == "run_stopped"
        await asyncio.wait_for(upstream.cancelled.wait(), 2)
        async with gw.client.post(f"/apps/shop/runs/{run_id}/stop", headers=CSRF) as again:
            assert (await again.json())["run"]["state"] == "ended"


async def test_the_run_holds_its_upstream_slot_until_it_ends_and_returns_it_once(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    upstream, server = counting
    upstream.delay = 0.01  # 30 events: 0.3 s
    async with _gateway(server, max_concurrent_requests=1) as gw:
        slots = gw.app[UPSTREAM_KEY].capacity.apps["shop"]
        capacity = gw.app[UPSTREAM_KEY].capacity
        run_id, _ = await _start(gw, 1)
        await asyncio.sleep(0.1)  # the browser is gone; the run pumps on
        assert slots.in_use == 1 and not upstream.finished.is_set()
        async with gw.client.post(CHAT, headers=CSRF, json={"message": "2"}) as busy:
            assert busy.status == 503
            assert (await busy.json())["error"]["code"] == "upstream_busy"
        await asyncio.wait_for(upstream.finished.wait(), 5)
        await _wait_for(lambda: gw.app[RUNS_KEY].runs[run_id].log.end is not None)
        assert (slots.in_use, capacity.in_use, slots.sessions, slots.clients) == (0, 0, {}, {})
        async with gw.client.post(CHAT, headers=CSRF, json={"message": "3"}) as again:
            assert again.status == 200
            await read_events(again)
        await _wait_for(lambda: slots.in_use == 0)
        assert capacity.in_use == 0


class _FailingStore:
    async def budget_used(self, *args: Any, **kwargs: Any) -> int:
        return 0

    async def create(self, *args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("ConnectionError: refused")

    async def create_ended(self, *args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("ConnectionError: refused")

    async def meta(self, run_id: str) -> None:
        return None  # (asked after a failed write: nothing was written)


class _OverBudgetStore:
    """The application's ended runs hold more than its `resume_redis_budget_bytes`."""

    async def budget_used(self, *args: Any, **kwargs: Any) -> int:
        return 64 * 1024 * 1024

    async def create(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("no run is created over the budget")


class _SlowEndStore:
    """Redis holds nothing of the application yet, and recording a run's end takes until
    `recorded` is set (a slow Redis, a big run)."""

    def __init__(self) -> None:
        self.recorded = asyncio.Event()
        self.counted: list[int] = []
        self.cut: list[str] = []
        self.finished: list[str] = []

    async def budget_used(self, *args: Any, **kwargs: Any) -> int:
        return 0

    async def create(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def append(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def tick(self, *args: Any, **kwargs: Any) -> tuple[bool, int]:
        return False, 1000

    async def end(self, *args: Any, reason: str, **kwargs: Any) -> None:
        if reason == "run_over_budget":  # a cut: recorded at once
            self.cut.append(reason)
            return
        await self.recorded.wait()

    async def budget_add(self, app_id: str, size: int, **kwargs: Any) -> None:
        self.counted.append(size)

    async def budget_reserve(
        self, app_id: str, *, uncounted: int, budget: int, **kwargs: Any
    ) -> tuple[bool, int]:
        return uncounted < budget, 0  # near its budget: what BUDGET_RESERVE decides

    async def budget_publish(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def mark_finished(self, run_id: str) -> None:
        self.finished.append(run_id)


def _run_cost(upstream: CountingUpstream) -> int:
    """What one of `upstream`'s answers costs a run's budget (`run_cost` of its events)."""
    log = RunLog(max_events=10_000, max_bytes=1 << 30)
    body = b"".join(upstream.event(i) for i in range(upstream.count))
    log.extend(SseParser().feed(body + b"event: done\ndata: {}\n\n"))
    return run_cost(log, ENTRY_BYTES)


async def test_a_run_not_recorded_yet_counts_in_the_budget(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    """A client starts its next run as soon as the last answer arrived, before that run's end
    reached Redis: the replica adds its own uncounted runs, so the budget is not overrun: the
    next run, admitted (nothing is counted in Redis yet), stops going to Redis once its events
    would take the application over (`run_over_budget`), and its browser still gets them."""
    upstream, server = counting
    budget = _run_cost(upstream) * 3 // 2  # one run fits, two do not
    async with _gateway(server, resume_redis_budget_bytes=budget) as gw:
        registry = gw.app[RUNS_KEY]
        store = _SlowEndStore()
        registry.store = cast(RedisRunStore, store)
        bodies = []
        for _ in range(2):
            async with gw.client.post(CHAT, headers=CSRF, json={"message": "hi"}) as response:
                assert response.status == 200 and "X-Run-Id" in response.headers
                bodies.append(await response.read())
        # The cut run's browser got every event, as the first one's did.
        assert bodies[0] == bodies[1] and bodies[0].endswith(b"\nid: %d\n\n" % (upstream.count + 1))
        assert registry.counters.cut_over_budget == 1 and store.cut == ["run_over_budget"]
        await _wait_for(lambda: len(store.finished) == 1)  # its end where it ran, on its meta
        assert registry.uncounted.get("shop") > 0
        store.recorded.set()  # the first run's end: counted too (the cut was at once)
        await _wait_for(lambda: len(store.counted) == 2)
        assert registry.uncounted.get("shop") == 0 and min(store.counted) > 0


async def test_run_store_down_at_the_start_relays_without_resume(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    upstream, server = counting
    async with _gateway(server) as gw:
        registry = gw.app[RUNS_KEY]
        registry.store = cast(RedisRunStore, _FailingStore())
        async with gw.client.post(CHAT, headers=CSRF, json={"message": "hi"}) as response:
            assert response.status == 200
            assert "X-Run-Id" not in response.headers
            body = await response.read()
        expected = b"".join(CountingUpstream.event(i) for i in range(upstream.count))
        assert body == expected + b"event: done\ndata: {}\n\n"  # today's byte-exact relay
        assert registry.counters.unresumable == 1 and not registry.runs


async def test_run_store_down_when_the_whole_answer_had_arrived_relays_it_byte_exact() -> None:
    """The answer was all there at the start (taken from the upstream to create the run
    ended, `RunRegistry.start_ended`) and Redis failed: relayed as above, byte for byte."""
    upstream = WholeUpstream()
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with _gateway(server) as gw:
            registry = gw.app[RUNS_KEY]
            registry.store = cast(RedisRunStore, _FailingStore())
            async with gw.client.post(CHAT, headers=CSRF, json={"message": "hi"}) as response:
                assert response.status == 200
                assert "X-Run-Id" not in response.headers
                body = await response.read()
            assert body == upstream.body()
            counters = registry.counters
            assert counters.unresumable == 1 and counters.whole == 0 and not registry.runs
            assert registry.uncounted.get("shop") == 0  # what it reserved, given back
    finally:
        await server.close()


async def test_an_application_over_its_redis_budget_relays_without_resume(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    upstream, server = counting
    async with _gateway(server) as gw:
        registry = gw.app[RUNS_KEY]
        registry.store = cast(RedisRunStore, _OverBudgetStore())
        async with gw.client.post(CHAT, headers=CSRF, json={"message": "hi"}) as response:
            assert response.status == 200
            assert "X-Run-Id" not in response.headers
            body = await response.read()
        expected = b"".join(CountingUpstream.event(i) for i in range(upstream.count))
        assert body == expected + b"event: done\ndata: {}\n\n"  # today's byte-exact relay
        counters = registry.counters
        assert counters.over_budget == 1 and counters.unresumable == 1 and not registry.runs


async def test_a_client_over_its_run_rate_is_relayed_without_resume(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    upstream, server = counting
    async with _gateway(server, resume_runs_per_client=parse_rate_limit("2/minute")) as gw:
        run_ids = []
        for _ in range(3):
            async with gw.client.post(CHAT, headers=CSRF, json={"message": "hi"}) as response:
                assert response.status == 200
                run_ids.append(response.headers.get("X-Run-Id"))
                body = await response.read()
        assert run_ids[0] and run_ids[1] and run_ids[2] is None
        expected = b"".join(CountingUpstream.event(i) for i in range(upstream.count))
        assert body == expected + b"event: done\ndata: {}\n\n"  # today's byte-exact relay
        counters = gw.app[RUNS_KEY].counters
        assert counters.rate_limited == 1 and counters.unresumable == 1


async def test_a_plain_application_is_relayed_byte_exact_without_a_run(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    _, server = counting
    async with _gateway(server, resumable=False) as gw:
        async with gw.client.post(CHAT, headers=CSRF, json={"message": "hi"}) as response:
            assert "X-Run-Id" not in response.headers
            body = await response.read()
        assert body.startswith(CountingUpstream.event(0) + CountingUpstream.event(1))
        assert not gw.app[RUNS_KEY].runs


async def test_metrics_count_runs_resumes_and_replayed_events(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    upstream, server = counting
    async with _gateway(server) as gw:
        run_id, _ = await _start(gw, 3)
        await asyncio.wait_for(upstream.finished.wait(), 5)
        await asyncio.sleep(0.1)
        async with gw.client.get(
            f"/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "3"}
        ) as resumed:
            replayed = len(await read_events(resumed))
        async with gw.client.get("/metrics") as response:
            text = await response.text()
    assert replayed == upstream.count + 1 - 3
    assert "agent_bff_runs_active 0.0" in text
    assert "agent_bff_runs_started_total 1.0" in text
    assert "agent_bff_run_resumes_total 1.0" in text
    assert f"agent_bff_run_replayed_events_total {float(replayed)}" in text
    assert 'agent_bff_runs_ended_total{reason="done"} 1.0' in text


async def test_a_second_session_gets_404(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    _, server = counting
    async with _gateway(server) as gw:
        run_id, _ = await _start(gw, 1)
        async with aiohttp.ClientSession(
            base_url=gw.url, cookie_jar=aiohttp.CookieJar(unsafe=True)
        ) as other:
            async with other.post(CHAT, headers=CSRF, json={"message": "x"}) as own:
                await own.read()
            async with other.get(f"/apps/shop/runs/{run_id}") as response:
                assert response.status == 404


def _sandboxed(response: aiohttp.ClientResponse) -> bool:
    headers = response.headers
    return (
        headers.get("Content-Security-Policy") == PROXIED_CSP
        and headers.get("X-Content-Type-Options") == "nosniff"
    )


async def test_every_answer_of_the_runs_endpoints_is_sandboxed_like_a_proxied_one(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    """The resume stream, its JSON errors (400, 404, 503), 204 and the stop's 202 carry the
    sandbox CSP and `nosniff` that every proxied answer carries."""
    upstream, server = counting
    upstream.count, upstream.delay = 200, 0.02
    async with _gateway(server, {"RUN_READERS_PER_RUN": "1"}) as gw:
        run_id, _ = await _start(gw, 2)
        runs = f"/apps/shop/runs/{run_id}"
        async with gw.client.get(runs, headers={"Last-Event-ID": "2"}) as resumed:
            assert resumed.status == 200 and _sandboxed(resumed)
            await read_events(resumed, 1)
            async with gw.client.get(runs) as busy:  # one reader per run here
                assert busy.status == 503 and _sandboxed(busy)
                assert (await busy.json())["error"]["code"] == "upstream_busy"
                assert busy.headers["Retry-After"] == "1"
        for path, headers, status in (
            (runs, {"Last-Event-ID": "x"}, 400),
            ("/apps/shop/runs/not-a-run", {}, 404),
            (f"/apps/shop/runs/{'A' * 22}", {}, 404),
        ):
            async with gw.client.get(path, headers=headers) as response:
                assert response.status == status and _sandboxed(response), path
                assert response.content_type == "application/json"
        async with gw.client.post(f"{runs}/stop", headers=CSRF) as stop:
            assert stop.status == 202 and _sandboxed(stop)
        async with gw.client.post(f"/apps/shop/runs/{'A' * 22}/stop", headers=CSRF) as none:
            assert none.status == 404 and _sandboxed(none)
        await asyncio.wait_for(upstream.cancelled.wait(), 5)
        async with gw.client.get(runs) as ended:
            events = await read_events(ended)
            assert error_code(events[-1]) == "run_stopped"
        async with gw.client.get(
            runs, headers={"Last-Event-ID": str(event_id(events[-1]))}
        ) as done:
            assert done.status == 204 and _sandboxed(done)


async def test_a_wrong_method_or_unknown_application_on_a_runs_url_is_sandboxed(
    counting: tuple[CountingUpstream, TestServer],
) -> None:
    """The router's 405 (POST or DELETE on a run, GET on its stop) and the 404 of an unknown
    application's runs URL carry the same sandbox CSP and `nosniff` (docs/resumable-streams.md:
    every answer of the runs endpoints)."""
    _, server = counting
    async with _gateway(server) as gw:
        run_id, _ = await _start(gw, 2)
        for method, path, status in (
            ("POST", f"/apps/shop/runs/{run_id}", 405),
            ("DELETE", f"/apps/shop/runs/{run_id}", 405),
            ("GET", f"/apps/shop/runs/{run_id}/stop", 405),
            ("GET", f"/apps/nope/runs/{run_id}", 404),
            ("POST", f"/apps/nope/runs/{run_id}/stop", 404),
        ):
            async with gw.client.request(method, path, headers=CSRF) as response:
                assert response.status == status, (method, path)
                assert _sandboxed(response), (method, path, dict(response.headers))


@pytest.mark.parametrize(
    "env",
    [{"RUN_ENDED_MAX_RUNS": "2"}, {"RUN_ENDED_MAX_BYTES": "2000"}],
    ids=["runs", "bytes"],
)
async def test_ended_runs_kept_in_memory_are_bounded_oldest_ended_first(
    counting: tuple[CountingUpstream, TestServer], env: dict[str, str]
) -> None:
    """Each run here holds 31 events of ~45 bytes (1,000-2,000 bytes): with at most 2 ended
    runs, or 2,000 bytes of them, the oldest ended is forgotten (404) when a newer one ends."""
    upstream, server = counting
    upstream.delay = 0.0
    async with _gateway(server, env) as gw:
        registry = gw.app[RUNS_KEY]
        run_ids = []
        for _ in range(3):
            response = await gw.client.post(CHAT, headers=CSRF, json={"message": "hi"})
            run_ids.append(response.headers["X-Run-Id"])
            await read_events(response)
            await _wait_for(lambda: registry.active == 0)
        kept = 2 if "RUN_ENDED_MAX_RUNS" in env else 1
        for index, run_id in enumerate(run_ids):
            async with gw.client.get(f"/apps/shop/runs/{run_id}") as response:
                if index < len(run_ids) - kept:
                    assert response.status == 404, index
                else:
                    assert response.status == 200, index
                    events = await read_events(response)
                    assert [event_id(e) for e in events] == list(range(1, upstream.count + 2))
        assert 1000 <= registry.ended_bytes / kept <= 2000
        assert registry.ended_bytes <= int(env.get("RUN_ENDED_MAX_BYTES", 10**9))
        async with gw.client.get("/metrics") as metrics:
            text = await metrics.text()
        assert f"agent_bff_runs_evicted_total {float(len(run_ids) - kept)}" in text
