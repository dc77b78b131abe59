"""Nineteenth attack on resumable runs (branch attack-19, on main at 8641dd7): runs created
ended (`RunRegistry.start_ended`, `CREATE_ENDED`) when the upstream's whole answer had
arrived when the run started.

Each differential test sends one body twice through a gateway on the test's own Redis: once
whole (with its length: created ended) and once late (the head first, the same bytes 50 ms
later, chunked: pumped), and compares what a browser and Redis see.

Break (fixed in the same session): a `CREATE_ENDED` that landed in Redis but whose reply was
lost (the retries failed) left the run's keys for its window, counted in no budget
(`start_ended` uncounted its cost at once on any failure; `_settle_cost` keeps a pumped run's
failed count until its keys expire).
Held (plain tests): hostile bodies (CRLF, CR, BOM, comments, blank-line runs, id/retry
fields, empty data, only comments), the limits (256 KiB, max events, max bytes, one over),
Redis failing or out of memory at `CREATE_ENDED` (byte-exact relay, nothing counted or left),
another session or application (404), 40 answers started together near a 1 MB budget.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.keys import RUNS_KEY
from app.runs.store import RedisRunStore
from app.sessions.backend import StoreUnavailable
from tests.fake_upstream import app_settings, run_gateway
from tests.redis_server import RedisServer
from tests.runs_helpers import CSRF

pytestmark = pytest.mark.redis_server


class BodyUpstream:
    """An agent answering every chat with `body`: whole (one write with its length, it has
    all arrived when the run starts) or late (the head, then the body 50 ms later)."""

    def __init__(self, body: bytes, *, whole: bool, headers: dict[str, str] | None = None):
        self.body = body
        self.whole = whole
        self.headers = {"Content-Type": "text/event-stream", **(headers or {})}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if self.whole:
            return web.Response(body=self.body, headers=self.headers)
        response = web.StreamResponse(headers=self.headers)
        await response.prepare(request)
        await asyncio.sleep(0.05)
        if self.body:
            await response.write(self.body)
        await response.write_eof()
        return response


_REQUEST_ID = re.compile(rb'"request_id": "[0-9a-f]*"')


@dataclass
class Seen:
    status: int = 0
    run_id: str = ""
    body: bytes = b""
    resumes: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    stop: tuple[int, Any] = (0, None)
    meta: dict[Any, Any] = field(default_factory=dict)
    largest: Any = None
    ttls: dict[str, int] = field(default_factory=dict)
    whole: int = 0
    uncounted: int = 0
    typical: float | None = None


async def _observe(
    redis: RedisServer,
    body: bytes,
    *,
    whole: bool,
    resume_ids: tuple[str, ...] = (),
    headers: dict[str, str] | None = None,
    **app_fields: Any,
) -> Seen:
    upstream = BodyUpstream(body, whole=whole, headers=headers)
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    env = {"SESSION_STORE": "redis", "REDIS_URL": redis.url, "RUN_HEARTBEAT_SECONDS": "5"}
    settings = app_settings(server.make_url("/v1"), env, resumable=True, **app_fields)
    client = redis.client()
    seen = Seen()
    try:
        async with run_gateway(settings) as gw:
            async with gw.client.post(
                "/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
            ) as response:
                seen.status = response.status
                seen.run_id = response.headers.get("X-Run-Id", "")
                raw = _REQUEST_ID.sub(b"", await response.read())
                seen.body = raw.replace(seen.run_id.encode(), b"RUN")
            url = f"/apps/shop/runs/{seen.run_id}"
            for last in resume_ids:
                async with gw.client.get(url, headers={"Last-Event-ID": last}) as resumed:
                    raw = _REQUEST_ID.sub(b"", await resumed.read())
                    seen.resumes[last] = (resumed.status, raw.replace(seen.run_id.encode(), b"R"))
            async with gw.client.post(url + "/stop", headers=CSRF) as stopped:
                seen.stop = (stopped.status, await stopped.json())
            registry = gw.app[RUNS_KEY]
            seen.whole = registry.counters.whole
            await asyncio.sleep(0.05)
            seen.uncounted = registry.uncounted.get("shop")
            seen.typical = registry.budget._typical.get("shop")
    finally:
        await server.close()
    prefix = f"{settings.redis_aux_prefix}run:{{{seen.run_id}}}:"
    seen.meta = client.hgetall(prefix + "m")
    seen.largest = client.get(prefix + "z")
    seen.ttls = {kind: client.pttl(prefix + kind) for kind in "mehz"}
    client.close()
    return seen


def _same_run(created: Seen, pumped: Seen) -> None:
    assert created.whole == 1 and pumped.whole == 0, (created.whole, pumped.whole)
    assert created.status == pumped.status == 200
    assert created.body == pumped.body
    assert created.resumes == pumped.resumes
    assert created.stop[0] == pumped.stop[0]
    assert created.stop[1]["run"]["state"] == pumped.stop[1]["run"]["state"]
    # The owner is each session's conversation's: the rest of the meta hash must match.
    assert {k: v for k, v in created.meta.items() if k != b"o"} == {
        k: v for k, v in pumped.meta.items() if k != b"o"
    }
    assert created.largest == pumped.largest
    assert created.typical == pumped.typical
    assert created.uncounted == pumped.uncounted == 0
    for kind in "mez":
        assert (created.ttls[kind] > 0) == (pumped.ttls[kind] > 0), (created.ttls, pumped.ttls)


HOSTILE = {
    "crlf": b"data: a\r\n\r\ndata: b\r\nevent: x\r\n\r\ndata: c\r\n\r\n",
    "cr": b"data: a\r\rdata: b\r\rdata: c\r\r",
    "bom": b"\xef\xbb\xbfdata: a\n\ndata: b\n\ndata: c\n\n",
    "comments": b": hi\n\ndata: a\n: mid\n\n\n\n\n: only\n\ndata: b\n\ndata: c\n\n",
    "fields": b"id: 77\nretry: 10\ndata: a\n\nid\ndata: b\n\nretry: 5\n\ndata: c\n\n",
    "only_comments": b": one\n\n: two\n\n",
    "empty_data": b"data\n\ndata:\n\nevent: end\n\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_a_hostile_whole_answer_makes_the_pumped_run(
    shared_redis: RedisServer, name: str
) -> None:
    """Attack: hostile SSE bodies (CRLF, CR, a BOM, comments and blank-line runs, `id:` and
    `retry:` fields, only comments, bare fields), whole vs late. Measured: the first response,
    resumes after 0/1/2/3/4, the stop, the meta hash, the largest-entry key, the TTLs and the
    budget figures are the same. Expected: exactly the pumped run."""
    body = HOSTILE[name]
    ids = ("0", "1", "2", "3", "4")
    created = await _observe(shared_redis, body, whole=True, resume_ids=ids)
    pumped = await _observe(shared_redis, body, whole=False, resume_ids=ids)
    _same_run(created, pumped)


def _framed_body(total: int, size: int = 1000) -> bytes:
    """Events of about `size` bytes whose framed bytes (`event\\nid: N\\n\\n`) sum to `total`."""
    events: list[bytes] = []
    framed = 0
    seq = 1
    while True:
        overhead = len(b"\nid: %d\n\n" % seq) + len(b"data: ")
        left = total - framed
        if left - overhead <= size + 200:  # the last event takes the rest
            events.append(b"data: " + b"x" * (left - overhead))
            break
        events.append(b"data: " + b"x" * size)
        framed += size + overhead
        seq += 1
    return b"".join(event + b"\n\n" for event in events)


SIZES: dict[str, tuple[bytes, dict[str, Any], bool]] = {
    "entry_bytes_exact": (_framed_body(256 * 1024), {}, True),
    "entry_bytes_plus_one": (_framed_body(256 * 1024 + 1), {}, False),
    "max_events_exact": (b"data: a\n\ndata: b\n\ndata: c\n\n", {"resume_max_events": 3}, True),
    "max_events_plus_one": (
        b"data: a\n\ndata: b\n\ndata: c\n\ndata: d\n\n",
        {"resume_max_events": 3},
        False,
    ),
    "max_bytes_exact": (
        b"data: a\n\n" + b"data: " + b"y" * (4096 - 32 - 6) + b"\n\n",
        {"resume_max_bytes": 4096},
        True,
    ),
    "max_bytes_over": (
        b"data: a\n\n" + b"data: " + b"y" * (4096 - 32 - 5) + b"\n\n",
        {"resume_max_bytes": 4096},
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(SIZES))
async def test_a_whole_answer_at_the_limits_makes_the_pumped_run(
    shared_redis: RedisServer, name: str
) -> None:
    """Attack: bodies at `ENTRY_BYTES` (256 KiB framed) and one byte over, at
    `resume_max_events` and one over, with an event at `resume_max_bytes` and one byte over.
    Measured: the same first response, resumes, meta, largest-entry bucket and budget cost
    as the pumped run (created ended only within the limits). Expected: the pumped run."""
    body, fields, created_ended = SIZES[name]
    ids = ("0", "1", "2")
    created = await _observe(shared_redis, body, whole=True, resume_ids=ids, **fields)
    pumped = await _observe(shared_redis, body, whole=False, resume_ids=ids, **fields)
    assert created.whole == int(created_ended)
    created.whole = 1  # (`_same_run` checks it was the whole answer's way)
    _same_run(created, pumped)


BUDGET = 1_000_000
WHOLE_BODY = b"data: a\n\nevent: x\ndata: b\n\ndata: c\n\n"


@dataclass
class Failed:
    first: Seen
    status: int = 0
    body: bytes = b""
    run_header: str | None = None
    unresumable: int = 0
    uncounted: int = 0
    unsent: int = 0
    counted: int = 0  # what Redis's budget counter holds, after the ledger's flush
    typical: float = 0.0
    run_keys: list[bytes] = field(default_factory=list)
    lengths: dict[bytes, int] = field(default_factory=dict)


async def _second_run_failing(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch, how: str
) -> Failed:
    """A first whole run (the application's typical cost known: the next one reserves it),
    then a second whose `CREATE_ENDED` fails `how`: "before" (nothing written), "lost" (the
    script ran, its reply lost and the retries failed), "oom" (maxmemory reached)."""
    original = RedisRunStore.create_ended
    client = redis.client()

    async def failing(self: RedisRunStore, *args: Any, **kwargs: Any) -> None:
        if how == "before":
            raise StoreUnavailable("ConnectionError: a blip")
        if how == "lost":
            await original(self, *args, **kwargs)
            raise StoreUnavailable("TimeoutError: the reply was lost, the retries failed")
        client.config_set("maxmemory", "1")
        try:
            await original(self, *args, **kwargs)
        finally:
            client.config_set("maxmemory", "0")

    upstream = BodyUpstream(WHOLE_BODY, whole=True)
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    env = {"SESSION_STORE": "redis", "REDIS_URL": redis.url, "RUN_HEARTBEAT_SECONDS": "5"}
    settings = app_settings(server.make_url("/v1"), env, resumable=True)
    failed = Failed(Seen())
    try:
        async with run_gateway(settings) as gw:
            registry = gw.app[RUNS_KEY]
            async with gw.client.post(
                "/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
            ) as response:
                failed.first.run_id = response.headers["X-Run-Id"]
                failed.first.body = await response.read()
            assert registry.counters.whole == 1
            monkeypatch.setattr(RedisRunStore, "create_ended", failing)
            async with gw.client.post(
                "/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
            ) as response:
                failed.status = response.status
                failed.run_header = response.headers.get("X-Run-Id")
                failed.body = await response.read()
            monkeypatch.setattr(RedisRunStore, "create_ended", original)
            await asyncio.sleep(0.6)  # the ledger's batched counts flushed (0.25 s)
            assert registry.store is not None
            failed.counted = await registry.store.budget_used("shop", window_ms=60_000)
            failed.typical = registry.budget._typical.get("shop", 0.0)
            failed.unresumable = registry.counters.unresumable
            failed.uncounted = registry.uncounted.get("shop")
            failed.unsent = registry.budget._unsent_bytes.get("shop", 0)
            pattern = f"{settings.redis_aux_prefix}run:*:e"
            failed.run_keys = sorted(client.scan_iter(match=pattern))
            failed.lengths = {key: client.xlen(key) for key in failed.run_keys}
    finally:
        await server.close()
        client.close()
    return failed


async def test_redis_failing_at_create_ended_relays_the_answer_byte_for_byte(
    shared_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: `CREATE_ENDED` raises `StoreUnavailable` (nothing written) for the second run of
    an application (its typical cost reserved). Measured: 200, the upstream's exact body, no
    run id, one unresumable, nothing uncounted or unsent left, only the first run's keys.
    Expected: that (held)."""
    failed = await _second_run_failing(shared_redis, monkeypatch, "before")
    assert failed.status == 200 and failed.run_header is None
    assert failed.body == WHOLE_BODY
    assert failed.unresumable == 1
    assert failed.uncounted == 0
    assert len(failed.run_keys) == 1


async def test_redis_out_of_memory_at_create_ended_leaves_nothing_and_relays(
    shared_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: Redis at `maxmemory` (noeviction) exactly when `CREATE_ENDED` runs. Measured:
    200, the exact body relayed, no run id, no second run's keys, nothing uncounted.
    Expected: that (held)."""
    failed = await _second_run_failing(shared_redis, monkeypatch, "oom")
    assert failed.status == 200 and failed.run_header is None
    assert failed.body == WHOLE_BODY
    assert failed.unresumable == 1 and failed.uncounted == 0
    assert len(failed.run_keys) == 1


async def test_a_created_ended_run_whose_reply_was_lost_still_counts_in_the_budget(
    shared_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: `CREATE_ENDED` runs in Redis but its reply is lost and the retries fail
    (`StoreUnavailable` after the write). Measured (447b20f): the second run's keys (1 entry,
    its events and end) stayed in Redis for its 60 s window, but the budget held 6696 bytes
    (the first run only: counter 6696, uncounted 0, unsent 0): `start_ended` uncounted the
    cost at once on any failure, and the answer was relayed without resume. Fixed: a failed
    write asks Redis whether the run exists (its meta): it does, so it is the run it is --
    answered with its id and counted like any other."""
    failed = await _second_run_failing(shared_redis, monkeypatch, "lost")
    assert failed.status == 200 and failed.run_header is not None
    assert failed.body == failed.first.body  # the same events and ids as the first run
    assert failed.unresumable == 0
    assert len(failed.run_keys) == 2, failed.run_keys  # the lost run is in Redis
    assert failed.counted >= 2 * failed.typical, (failed.counted, failed.typical)
    assert failed.uncounted == 0 and failed.unsent == 0


async def test_a_create_ended_whose_outcome_redis_cannot_tell_counts_until_it_would_expire(
    shared_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same lost reply, and Redis does not answer the question whether the run exists
    either: the answer is relayed without resume, and the run's cost stays counted here (in
    `uncounted`) until its keys would have expired, as a pumped run whose end's count failed
    does (`RunRegistry._settle_cost`)."""

    async def unknown(self: RedisRunStore, run_id: str) -> None:
        raise StoreUnavailable("TimeoutError: still down")

    monkeypatch.setattr(RedisRunStore, "meta", unknown)
    failed = await _second_run_failing(shared_redis, monkeypatch, "lost")
    assert failed.status == 200 and failed.run_header is None and failed.body == WHOLE_BODY
    assert failed.unresumable == 1 and len(failed.run_keys) == 2
    held = failed.counted + failed.uncounted + failed.unsent
    assert held >= 2 * failed.typical, (failed.counted, failed.uncounted, failed.unsent)


async def test_another_session_or_application_cannot_read_or_stop_a_created_ended_run(
    shared_redis: RedisServer,
) -> None:
    """Attack: a created-ended run's id used from another session (no cookie) and from
    another application (`mall`, same upstream). Measured: 404 for a resume and a stop from
    either; the owner still gets its events. Expected: that (held)."""
    upstream = BodyUpstream(WHOLE_BODY, whole=True)
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    env = {"SESSION_STORE": "redis", "REDIS_URL": shared_redis.url}
    settings = app_settings(server.make_url("/v1"), env, resumable=True)
    shop = settings.apps["shop"]
    mall = dataclasses.replace(shop, app_id="mall")
    settings = dataclasses.replace(settings, apps={"shop": shop, "mall": mall})
    try:
        async with run_gateway(settings) as gw:
            async with gw.client.post(
                "/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
            ) as response:
                run_id = response.headers["X-Run-Id"]
                await response.read()
            assert gw.app[RUNS_KEY].counters.whole == 1
            async with aiohttp.ClientSession(base_url=gw.url) as stranger:
                for app_id in ("shop", "mall"):
                    url = f"/apps/{app_id}/runs/{run_id}"
                    async with stranger.get(url, headers={"Last-Event-ID": "0"}) as resumed:
                        assert resumed.status == 404, app_id
                    async with stranger.post(url + "/stop", headers=CSRF) as stopped:
                        assert stopped.status == 404, app_id
            async with gw.client.get(f"/apps/mall/runs/{run_id}") as other_app:
                assert other_app.status == 404
            async with gw.client.post(f"/apps/mall/runs/{run_id}/stop", headers=CSRF) as stop:
                assert stop.status == 404
            async with gw.client.get(
                f"/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "0"}
            ) as own:
                assert own.status == 200
                assert len((await own.read()).split(b"\n\n")) == 4
    finally:
        await server.close()


async def _held_by_concurrent_runs(
    redis: RedisServer, *, whole: bool, runs: int
) -> tuple[int, int]:
    """`runs` answers of ~20 KB started together on one gateway with a 1 MB budget: the
    framed bytes their runs hold in Redis afterwards, and how many were created ended."""
    body = b"".join(b"data: " + b"z" * 2000 + b"\n\n" for _ in range(10))
    client = redis.client()
    client.flushall()
    upstream = BodyUpstream(body, whole=whole)
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    env = {"SESSION_STORE": "redis", "REDIS_URL": redis.url, "RUN_HEARTBEAT_SECONDS": "5"}
    settings = app_settings(
        server.make_url("/v1"), env, resumable=True, resume_redis_budget_bytes=BUDGET
    )

    async def one(gw: Any) -> None:
        async with (
            aiohttp.ClientSession(base_url=gw.url) as browser,
            browser.post("/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}) as response,
        ):
            assert response.status == 200
            await response.read()

    try:
        async with run_gateway(settings) as gw:
            await asyncio.gather(*(one(gw) for _ in range(runs)))
            await asyncio.sleep(0.3)
            created_ended = gw.app[RUNS_KEY].counters.whole
        held = 0
        for key in client.scan_iter(match=f"{settings.redis_aux_prefix}run:*:e"):
            entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(key)  # type: ignore[assignment]
            held += sum(len(entry.get(b"d", b"")) for _, entry in entries)
    finally:
        await server.close()
        client.close()
    return held, created_ended


async def test_whole_answers_started_together_hold_no_more_than_pumped_ones(
    shared_redis: RedisServer,
) -> None:
    """Attack: 40 answers of ~20 KB (10 events) started together against a 1 MB budget,
    whole vs late (pumped). Measured: 7 created ended (the rest pumped once near the budget),
    15 cut over budget either way, 507035 framed bytes held in Redis both ways. Expected:
    the created-ended runs hold no more than the pumped ones, and within the budget
    (held)."""
    created, whole = await _held_by_concurrent_runs(shared_redis, whole=True, runs=40)
    pumped, _ = await _held_by_concurrent_runs(shared_redis, whole=False, runs=40)
    assert whole > 0
    assert created <= max(pumped, BUDGET), (created, pumped)
