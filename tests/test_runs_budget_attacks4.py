"""Fourth attack on resumable runs in Redis (branch attack-replay-7, after 9ca2a97): the
per-process catch-up gate (`RUN_CATCHUP_READS`, `RedisRunStore.range_after`).

The gate bounds what Redis buffers for catch-up reads, but waiting for it has no deadline and
no share per application: readers queue in one FIFO behind whatever holds it. Each test plays
application `shop`'s hostile owner (its own runs, its own browser clients) against a real
gateway process and a real redis-server, and measures what `other`'s reader gets.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from app.runs.entries import CATCHUP_BYTES, next_catchup_count
from app.runs.readers import READ_COUNT
from app.runs.store import RedisRunStore
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import RedisOptions, make_client
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer
from tests.runs_helpers import (
    CSRF,
    CountingUpstream,
    SseUpstream,
    other_users,
    redis_at,
    redis_runs_env,
    replay_whole,
    start_run_of,
    start_upstreams,
)

pytestmark = pytest.mark.redis_server


@pytest.fixture
def redis(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("256mb", "noeviction") as server:
        yield server


class ManyEntriesUpstream(SseUpstream):
    """An upstream answering `count` events of `size` bytes of data each, one per write: each
    over half of `ENTRY_BYTES`, so each is a stream entry of its own."""

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.size = size

    async def write_events(self, response: web.StreamResponse) -> None:
        for i in range(self.count):
            await response.write(b"data: " + bytes([97 + i % 26]) * self.size + b"\n\n")
            await asyncio.sleep(0.005)


async def test_readers_queued_on_the_catchup_gate_fail_fast_when_redis_stalls(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: `shop`'s owner replays 8 ended runs of its own (16 entries of 250 KB each,
    ~4 MB a run) from the start, 8 readers per run (the `run` cap), 64 at a time (the
    `client` cap): each replay is ~11 `XRANGE`s, each through the gate (4 in flight), so ~60
    readers wait in the gate at any moment. `other`'s user replays its own ended run (12
    entries of 300 KB) meanwhile. Then Redis stalls (SIGSTOP: connections open, nothing
    answers; a failover, a long `DEBUG SLEEP`/script, a network partition look the same).

    Each `XRANGE` in the gate now waits its whole `REDIS_OP_TIMEOUT_SECONDS` (1 s here)
    before it fails and frees its slot for the next waiter, whose `XRANGE` then waits its own
    1 s: the waiters fail 4 at a time, one op timeout per round. The wait in the gate counts
    in no deadline (`range_after` takes the semaphore outside `_run`'s budget), and a reader
    waiting there gets no keep-alive.

    Measured (9ca2a97, one replica, 2 shared cores): the last of the 65 readers got its
    `event: error` `run_store_unavailable` 11.4-13.1 s after the stall (median 5.9-6.5 s,
    the first 0.7 s; failed in 6 of 7 runs, passed once in a run of the whole file, not
    explained); `other`'s reader 1.7-9.3 s after it, queued behind `shop`'s
    readers, receiving nothing meanwhile. One op timeout (1 s) is what a single reader waits.
    With the default `REDIS_OP_TIMEOUT_SECONDS` (2) that is ~25 s for 64 readers, and more
    with more readers (64 per client address, 8 per run: the gate's queue is bounded only by
    the runs the budgets allow).
    Expected: every reader learns of the failure within about one op timeout of it
    (`event: error` within 2 x `REDIS_OP_TIMEOUT_SECONDS` + 1 s = 3 s here), whatever the
    number of readers queued before it (e.g. the wait for the gate inside the operation's
    deadline, or waiters failed with the holder's failure)."""
    async with AsyncExitStack() as stack:
        shop_url, other_url = await start_upstreams(
            stack,
            ManyEntriesUpstream(16, 250_000).app(),
            ManyEntriesUpstream(12, 300_000).app(),
        )
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{shop_url}"\nresumable = true\n'
            f'[apps.other]\nupstream = "{other_url}"\nresumable = true\n',
        )
        op_timeout = 1.0
        env["REDIS_OP_TIMEOUT_SECONDS"] = str(op_timeout)
        with GatewayProcess(env) as gateway:
            shop = aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True),
                connector=aiohttp.TCPConnector(limit=200),
            )
            stack.push_async_callback(shop.close)
            other = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            stack.push_async_callback(other.close)
            shop_runs = [await start_run_of(shop, gateway.url, "shop") for _ in range(8)]
            other_run = await start_run_of(other, gateway.url, "other")
            await asyncio.sleep(0.5)  # the ends are recorded

            stalled_at: float | None = None
            # Per reader: (application, seconds from the stall to its answer's end, outcome).
            outcomes: list[tuple[str, float, str]] = []
            replays = 0

            async def reader(http: aiohttp.ClientSession, app_id: str, run_id: str) -> None:
                nonlocal replays
                while stalled_at is None:
                    try:
                        async with http.get(
                            f"{gateway.url}/apps/{app_id}/runs/{run_id}",
                            headers={"Last-Event-ID": "0"},
                        ) as response:
                            body = await asyncio.wait_for(response.read(), 40)
                            status = response.status
                    except TimeoutError:
                        body, status = b"", -1  # still nothing 40 s on: a hang
                    if stalled_at is None:
                        replays += 1
                        continue
                    took = time.monotonic() - stalled_at
                    if b"run_store_unavailable" in body:
                        outcome = "error event"
                    elif status == -1:
                        outcome = "hang"
                    elif status != 200:
                        outcome = f"status {status}"
                    else:
                        outcome = "whole replay"
                    outcomes.append((app_id, took, outcome))

            tasks = [
                asyncio.create_task(reader(shop, "shop", run_id))
                for run_id in shop_runs
                for _ in range(8)
            ]
            tasks.append(asyncio.create_task(reader(other, "other", other_run)))
            await asyncio.sleep(2.0)
            assert replays > 0 and not any(task.done() for task in tasks), replays
            redis.pause()
            stalled_at = time.monotonic()
            try:
                await asyncio.wait_for(asyncio.gather(*tasks), 45)
            finally:
                redis.resume()
    failed = sorted(took for _, took, outcome in outcomes if outcome != "whole replay")
    other_took = [round(took, 1) for app_id, took, _ in outcomes if app_id == "other"]
    kinds: dict[str, int] = {}
    for _, _, outcome in outcomes:
        kinds[outcome] = kinds.get(outcome, 0) + 1
    assert len(outcomes) == 65 and "hang" not in kinds, (len(outcomes), kinds)
    limit = 2 * op_timeout + 1
    assert failed and failed[-1] <= limit, (
        f"{replays} replays answered before Redis stalled; then {len(failed)} readers learned "
        f"of the failure ({kinds}) {failed[0]:.1f}-{failed[-1]:.1f} s after the "
        f"stall (median {failed[len(failed) // 2]:.1f} s; op timeout {op_timeout} s, limit "
        f"{limit} s); other's reader after {other_took} s"
    )


@pytest.mark.serial
async def test_one_applications_replays_do_not_starve_another_applications_replay(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: as above, `shop`'s owner keeps 64 replays of its 8 ended ~4.1 MB runs (one
    entry each, as in attack-budget-3) going, so ~60 of its reads wait in the process's one
    catch-up gate at any moment. `other`'s user replays its own ended run: 12 entries of 300 KB
    (3.6 MB), each over `CATCHUP_BYTES`, so 12 `XRANGE`s of one entry, each queued in the same
    FIFO behind `shop`'s ~60 waiters: the gate has no share per application, so `other` gets
    1/65 of it.

    Measured (9ca2a97, one replica, 2 shared cores): `other`'s replay took ~0.012 s alone and
    3.2-8.4 s during the flood (~300 times as long; 1,693-1,867 replays of `shop` answered
    meanwhile; every replay whole: nothing fails, it just crawls; the wait grows with the
    number of `shop`'s readers, 64 per client address).
    Expected: one application's readers cannot take the whole gate (e.g. a share of
    `RUN_CATCHUP_READS` per application, as `follow_share` for follow connections): `other`'s
    replay within 1 s + 3 x its time alone."""
    async with AsyncExitStack() as stack:
        shop_url, other_url = await start_upstreams(
            stack,
            ManyEntriesUpstream(1, 4_100_000).app(),
            ManyEntriesUpstream(12, 300_000).app(),
        )
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{shop_url}"\nresumable = true\n'
            f'[apps.other]\nupstream = "{other_url}"\nresumable = true\n',
        )
        with GatewayProcess(env) as gateway:
            shop = aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True),
                connector=aiohttp.TCPConnector(limit=200),
            )
            stack.push_async_callback(shop.close)
            other = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            stack.push_async_callback(other.close)
            shop_runs = [await start_run_of(shop, gateway.url, "shop") for _ in range(8)]
            other_run = await start_run_of(other, gateway.url, "other")
            await asyncio.sleep(0.5)  # the ends are recorded
            alone = min(
                [await replay_whole(other, gateway.url, "other", other_run) for _ in range(3)]
            )

            flooding = True
            replays = 0

            async def flood(run_id: str) -> None:
                nonlocal replays
                while flooding:
                    async with shop.get(
                        f"{gateway.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "0"}
                    ) as response:
                        await response.read()
                        replays += response.status == 200

            tasks = [asyncio.create_task(flood(run_id)) for run_id in shop_runs for _ in range(8)]
            try:
                await asyncio.sleep(1.5)
                during = [
                    await replay_whole(other, gateway.url, "other", other_run) for _ in range(2)
                ]
            finally:
                flooding = False
                await asyncio.wait_for(asyncio.gather(*tasks), 30)
    limit = 1 + 3 * alone
    assert max(during) <= limit, (
        f"other's replay (12 entries, 3.6 MB): {alone:.2f} s alone, {during[0]:.1f} and "
        f"{during[1]:.1f} s while shop replayed its runs 64 at a time ({replays} replays of "
        f"4 MB answered); limit {limit:.1f} s"
    )


class PacedUpstream(SseUpstream):
    """`other`'s upstream: `count` events of `size` bytes of data, `delay` apart (after a
    first pause, so a reader elsewhere is following before the first), each a stream entry
    over `CATCHUP_BYTES`: a follower goes back to the catch-up gate after every one."""

    def __init__(self, count: int, size: int, delay: float) -> None:
        self.count = count
        self.size = size
        self.delay = delay

    async def write_events(self, response: web.StreamResponse) -> None:
        await asyncio.sleep(0.5)
        for i in range(self.count):
            await response.write(f"data: {i} ".encode() + b"p" * self.size + b"\n\n")
            await asyncio.sleep(self.delay)


@pytest.mark.serial
async def test_a_live_follower_of_another_application_keeps_up_during_replays(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: two replicas A and B. On B, `shop`'s owner keeps 64 replays of its 8 ended
    ~4.1 MB runs going (as above). `other`'s user starts a run on A (40 events of 300 KB,
    50 ms apart: 6 MB/s, 12 MB in all; the run's log and stream keep the last 4 MiB, ~13
    events), drops the answer at once and follows the run on B from its start (what
    `EventSource` does after a network change). B's follower reads each 300 KB entry (over
    `CATCHUP_BYTES`) and so goes back to the gate for the next one: one entry per turn of
    the gate, behind `shop`'s ~60 waiters.

    Measured (9ca2a97, 2 shared cores): without `shop`'s replays `other`'s reader on B got
    all 40 events; with them it got 1-3 events (3 runs), then `event: error` `resume_too_old` (442
    replays of `shop` answered meanwhile). Paced at 100 ms (3 MB/s): 7 events, then
    `resume_too_old`; at 200 ms (1.5 MB/s, 30 events) it kept up. With
    `RUN_CATCHUP_READS=64` (no gate to speak of) it also failed (1 event): the follower's
    catch-up reads share the session client, its pipelined connection and the gate's FIFO
    with every application's replays, so each of its one-entry reads waits behind them
    (~0.27 s a read here, as `other`'s replay above). The follower fell further behind the
    pump with every event until the entries it had not read yet were trimmed from the stream:
    the live reader of a live run got `event: error` `resume_too_old`, its answer lost, because
    another application's user was replaying its own runs.
    Expected: a follower of a live run keeps up with a pump writing 6 MB/s whatever other
    applications read (every event once, in order, no error): e.g. its catch-up on its own
    follow connection (one entry at a time keeps the reply bound), or a share of the gate
    per application that another's readers cannot queue in front of."""
    async with AsyncExitStack() as stack:
        shop_url, other_url = await start_upstreams(
            stack,
            ManyEntriesUpstream(1, 4_100_000).app(),
            PacedUpstream(40, 300_000, 0.05).app(),
        )
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{shop_url}"\nresumable = true\n'
            f'[apps.other]\nupstream = "{other_url}"\nresumable = true\n',
        )
        with GatewayProcess(env) as a, GatewayProcess(env) as b:
            shop = aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True),
                connector=aiohttp.TCPConnector(limit=200),
            )
            stack.push_async_callback(shop.close)
            other = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            stack.push_async_callback(other.close)
            shop_runs = [await start_run_of(shop, b.url, "shop") for _ in range(8)]

            async def follow_other() -> tuple[int, list[str]]:
                """Start other's run on A, drop it, follow it on B: (events, errors)."""
                async with other.post(
                    f"{a.url}/apps/other/agent/chat", headers=CSRF, json={"message": "x"}
                ) as response:
                    assert response.status == 200, response.status
                    run_id = response.headers["X-Run-Id"]
                    response.close()
                async with other.get(
                    f"{b.url}/apps/other/runs/{run_id}", headers={"Last-Event-ID": "0"}
                ) as response:
                    assert response.status == 200, response.status
                    body = await asyncio.wait_for(response.read(), 30)
                events = [e for e in body.split(b"\n\n") if e and not e.startswith(b":")]
                errors = [e.decode()[:120] for e in events if e.startswith(b"event: error")]
                return len(events) - len(errors), errors

            alone = await follow_other()
            assert alone == (40, []), alone
            flooding = True
            replays = 0

            async def flood(run_id: str) -> None:
                nonlocal replays
                while flooding:
                    async with shop.get(
                        f"{b.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "0"}
                    ) as response:
                        await response.read()
                        replays += response.status == 200

            tasks = [asyncio.create_task(flood(run_id)) for run_id in shop_runs for _ in range(8)]
            try:
                await asyncio.sleep(1.0)
                during = await follow_other()
            finally:
                flooding = False
                await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert during == (40, []), (
        f"other's live reader on B: (events, errors) {alone} without shop's replays, {during} "
        f"while shop replayed its runs 64 at a time on B ({replays} replays answered)"
    )


def _rss(pid: int) -> int:
    """The resident set size in bytes of process `pid`."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * 4096


async def _silent_reader(url: str, path: str, cookie: str) -> socket.socket:
    """A connection that asks for `path` and then never reads (a 4 KiB receive buffer)."""
    base = URL(url)
    assert base.host is not None and base.port is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (base.host, base.port))
    head = f"GET {path} HTTP/1.1\r\nHost: {base.host}:{base.port}\r\nCookie: {cookie}\r\n\r\n"
    await loop.sock_sendall(sock, head.encode())
    return sock


async def test_silent_readers_of_one_event_runs_hold_no_copy_of_the_run_each(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: `shop`'s upstream answers runs of ONE ~4.1 MB event (within the default
    `resume_max_bytes`, 4 MiB: one stream entry, as in attack-budget-3); its owner opens 8
    readers per run (the `run` cap) of 8 such ended runs (within its budget) from the start,
    64 connections with a 4 KiB receive buffer that never read. The gate lets 4 `XRANGE`s
    through at a time, but each reader keeps the entry it read (4.1 MB) while it waits for
    its silent browser to drain (`follow_remote` holds the batch through `write_pieces`):
    the gate bounds what Redis buffers, not what the readers hold after it.

    Measured (9ca2a97, one replica): the gateway's RSS grew by 291-299 MiB within 3 s (tests/
    test_runs_slow_readers.py allows +112 MiB for 48 readers of 512 KiB events; the docs:
    "a reader that reads slowly or not at all holds ... never a copy of the whole log").
    The `run` cap times the runs the budget allows (~11 of 4.1 MB) is all that bounds it;
    the number of replicas does not matter (each is attacked alike).
    Expected: silent readers hold about a piece each beyond the transport's buffers (e.g. an
    entry read in slices, `XRANGE` of the entry's bytes only as they drain, or the gate held
    until the batch is written): +112 MiB at most, as for 48 readers of smaller events.
    Fixed (issue 17, session 8): the readers of a run in one process share the large entries
    they hold (app/runs/entries.py `SharedEntries`), and a reader whose next entry another
    reader holds takes it without a read."""
    async with AsyncExitStack() as stack:
        (shop_url,) = await start_upstreams(stack, ManyEntriesUpstream(1, 4_100_000).app())
        env = redis_runs_env(
            tmp_path, redis.url, f'[apps.shop]\nupstream = "{shop_url}"\nresumable = true\n'
        )
        with GatewayProcess(env) as gateway:
            jar = aiohttp.CookieJar(unsafe=True)
            shop = aiohttp.ClientSession(cookie_jar=jar)
            stack.push_async_callback(shop.close)
            runs = [await start_run_of(shop, gateway.url, "shop") for _ in range(8)]
            await asyncio.sleep(0.5)  # the ends are recorded: replays read Redis
            async with shop.get(
                f"{gateway.url}/apps/shop/runs/{runs[0]}", headers={"Last-Event-ID": "0"}
            ) as check:
                assert len(await check.read()) > 4_100_000
            cookie = "; ".join(f"{m.key}={m.value}" for m in jar)
            before = _rss(gateway.pid)
            socks = [
                await _silent_reader(gateway.url, f"/apps/shop/runs/{run_id}", cookie)
                for run_id in runs
                for _ in range(8)
            ]
            try:
                grown = 0
                for _ in range(30):
                    await asyncio.sleep(0.1)
                    grown = max(grown, _rss(gateway.pid) - before)
            finally:
                for sock in socks:
                    sock.close()
    print(f"64 silent readers of 8 one-event runs: RSS +{grown >> 20} MiB")
    assert grown < 112 * 2**20, f"64 silent readers of 8 one-event runs: RSS +{grown >> 20} MiB"


async def test_readers_that_leave_while_queued_on_the_gate_leak_no_slot(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack (HOLDS, passes on 9ca2a97): 4 rounds of 64 resumes of `shop`'s 8 ended one-event
    runs (4.1 MB) whose connections close 0-30 ms after the request: the readers leave while
    they wait in the gate, or while their `XRANGE` is in flight, or while they write. A
    slot lost on one of these paths would leave fewer than `RUN_CATCHUP_READS` (4) for
    everybody after (all 4: every replay of the process hangs).

    Measured (9ca2a97): 64 whole replays took 0.54 s after the 256 abandoned resumes, 0.57 s
    before (the gateway keeps running a reader's handler after its browser left, so a
    queued reader still does its one `XRANGE`, then fails its first write and releases; the
    semaphore of Python 3.11.7 gives a cancelled waiter's wake-up to the next). Every replay
    whole, no slot lost."""
    async with AsyncExitStack() as stack:
        (shop_url,) = await start_upstreams(stack, ManyEntriesUpstream(1, 4_100_000).app())
        env = redis_runs_env(
            tmp_path, redis.url, f'[apps.shop]\nupstream = "{shop_url}"\nresumable = true\n'
        )
        with GatewayProcess(env) as gateway:
            jar = aiohttp.CookieJar(unsafe=True)
            shop = aiohttp.ClientSession(cookie_jar=jar, connector=aiohttp.TCPConnector(limit=200))
            stack.push_async_callback(shop.close)
            runs = [await start_run_of(shop, gateway.url, "shop") for _ in range(8)]
            await asyncio.sleep(0.5)
            cookie = "; ".join(f"{m.key}={m.value}" for m in jar)

            async def replays() -> float:
                """64 whole replays at once: seconds."""
                began = time.monotonic()

                async def one(run_id: str) -> None:
                    async with shop.get(
                        f"{gateway.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "0"}
                    ) as response:
                        body = await asyncio.wait_for(response.read(), 30)
                        assert response.status == 200 and len(body) == 4_100_014, (
                            response.status,
                            len(body),
                        )

                await asyncio.gather(*(one(run_id) for run_id in runs for _ in range(8)))
                return time.monotonic() - began

            before = min([await replays() for _ in range(2)])

            async def leave(run_id: str, delay: float) -> None:
                sock = await _silent_reader(gateway.url, f"/apps/shop/runs/{run_id}", cookie)
                await asyncio.sleep(delay)
                sock.close()

            for _ in range(4):
                await asyncio.gather(
                    *(leave(run_id, (i % 7) * 0.005) for run_id in runs for i in range(8))
                )
                await asyncio.sleep(0.3)
            await asyncio.sleep(1.0)  # the abandoned handlers finish
            after = min([await replays() for _ in range(2)])
    assert after <= 2 * before + 0.5, f"64 replays: {before:.2f} s before, {after:.2f} s after"


class EndlessUpstream(SseUpstream):
    """`other`'s upstream: a small event every 50 ms, for up to 30 s."""

    async def write_events(self, response: web.StreamResponse) -> None:
        for i in range(600):
            await response.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.05)


@pytest.mark.serial
async def test_a_follower_reports_its_pumper_dead_in_time_during_another_apps_replays(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: replica B follows `other`'s live run pumped by replica A (small events every
    50 ms) while `shop`'s owner keeps 64 replays of its 8 ended ~4.1 MB runs going on B (as
    above). A is SIGKILLed. B's follower sees the pumper's heartbeat gone after an empty
    `XREAD`, then reads the stream once more for an end written meanwhile: `range_after`,
    through the gate, behind `shop`'s waiters.

    The contract (app/runs/http.py): `event: error` `run_orphaned` within 4 heartbeats plus
    one; tests/test_runs_replicas.py allows 4 + 2 heartbeats + 1 s (2.5 s at 0.25 s).
    HOLDS (passes on 9ca2a97) within that tolerance: `run_orphaned` came 1.19 s after A's
    death alone, 1.03 and 1.77 s during `shop`'s replays (two runs; 1.77 s is past the strict
    4 + 1 heartbeats = 1.25 s of the docstring: the one gated read after the heartbeat is
    gone waits behind `shop`'s ~60 readers). Expected: within 2.5 s whatever another
    application reads."""
    async with AsyncExitStack() as stack:
        shop_url, other_url = await start_upstreams(
            stack, ManyEntriesUpstream(1, 4_100_000).app(), EndlessUpstream().app()
        )
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{shop_url}"\nresumable = true\n'
            f'[apps.other]\nupstream = "{other_url}"\nresumable = true\n',
        )
        with GatewayProcess(env) as b:
            shop = aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True),
                connector=aiohttp.TCPConnector(limit=200),
            )
            stack.push_async_callback(shop.close)
            other = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            stack.push_async_callback(other.close)
            shop_runs = [await start_run_of(shop, b.url, "shop") for _ in range(8)]

            async def orphaned_after(flood: bool) -> tuple[float, list[bytes]]:
                """Follow other's run on B, kill its pumper A: (seconds to the end, last
                events)."""
                with GatewayProcess(env) as a:
                    async with other.post(
                        f"{a.url}/apps/other/agent/chat", headers=CSRF, json={"message": "x"}
                    ) as response:
                        run_id = response.headers["X-Run-Id"]
                        response.close()
                    async with other.get(
                        f"{b.url}/apps/other/runs/{run_id}", headers={"Last-Event-ID": "0"}
                    ) as response:
                        assert response.status == 200
                        await response.content.readany()
                        flooding = flood
                        tasks = []

                        async def replay(run_id: str) -> None:
                            while flooding:
                                async with shop.get(
                                    f"{b.url}/apps/shop/runs/{run_id}",
                                    headers={"Last-Event-ID": "0"},
                                ) as r:
                                    await r.read()

                        tasks = [
                            asyncio.create_task(replay(r)) for r in shop_runs for _ in range(8)
                        ]
                        try:
                            await asyncio.sleep(1.5)
                            a.kill()
                            killed = time.monotonic()
                            body = await asyncio.wait_for(response.read(), 20)
                            took = time.monotonic() - killed
                        finally:
                            flooding = False
                            await asyncio.wait_for(asyncio.gather(*tasks), 30)
                events = [e for e in body.split(b"\n\n") if e and not e.startswith(b":")]
                return took, events[-1:]

            alone = await orphaned_after(False)
            during = await orphaned_after(True)
    assert b"run_orphaned" in alone[1][0] and alone[0] < 2.5, alone
    assert b"run_orphaned" in during[1][0] and during[0] < 2.5, (
        f"run_orphaned {alone[0]:.2f} s after A's death alone, {during[0]:.2f} s during "
        f"shop's replays on B ({during[1]})"
    )


class MixedUpstream(SseUpstream):
    """An upstream whose events switch a follower between catch-up and `XREAD`: small ones
    (some in bursts of 5 in one write), and ones of 120-300 KB (one over `CATCHUP_BYTES`
    sends the follower back to the gate; two of 200 KB in one `XREAD` do too), 20 ms apart."""

    SIZES = (10, 300_000, 50, 200_000, 5, 140_000, 120_000, 30, 270_000)

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    async def write_events(self, response: web.StreamResponse) -> None:
        n = 0
        await asyncio.sleep(0.3)
        for r in range(self.rounds):
            for size in self.SIZES:
                if size == 5:
                    burst = b"".join(f"data: {n + k} b\n\n".encode() for k in range(5))
                    await response.write(burst)
                    n += 5
                else:
                    await response.write(f"data: {n} ".encode() + b"m" * size + b"\n\n")
                    n += 1
                await asyncio.sleep(0.02 if r % 2 else 0.005)


async def test_followers_switching_between_catchup_and_xread_lose_and_repeat_nothing(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """HOLDS (passes on 9ca2a97): a run pumped on A whose events switch B's follower between
    gated catch-up reads and `XREAD BLOCK` again and again (small events, bursts, 120-300 KB
    events, paced and back to back; 6 rounds, 78 events, ~6.2 MB, more than the run's
    4 MiB: read live, nothing is trimmed before it is read), read on B by a reader from the
    start and by readers joining later (0.5 and 0.9 s on) from ids 3 and 30 (through the
    follower's copy, or `XRANGE` first when further back). Each got exactly the events after
    its id, once each, in order, byte for byte as A's own answer (the reference); 3 runs."""
    async with AsyncExitStack() as stack:
        (url,) = await start_upstreams(stack, MixedUpstream(6).app())
        env = redis_runs_env(
            tmp_path, redis.url, f'[apps.shop]\nupstream = "{url}"\nresumable = true\n'
        )
        with GatewayProcess(env) as a, GatewayProcess(env) as b:
            http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            stack.push_async_callback(http.close)
            async with http.post(
                f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "x"}
            ) as first:
                run_id = first.headers["X-Run-Id"]

                async def read_b(after: int, delay: float) -> list[bytes]:
                    await asyncio.sleep(delay)
                    async with http.get(
                        f"{b.url}/apps/shop/runs/{run_id}",
                        headers={"Last-Event-ID": str(after)},
                    ) as response:
                        assert response.status == 200, response.status
                        body = await asyncio.wait_for(response.read(), 30)
                    return [e for e in body.split(b"\n\n") if e and not e.startswith(b":")]

                reference, *readers = await asyncio.gather(
                    first.read(), read_b(0, 0.0), read_b(3, 0.5), read_b(30, 0.9)
                )
    events = [e for e in reference.split(b"\n\n") if e and not e.startswith(b":")]
    assert len(events) == 6 * (len(MixedUpstream.SIZES) + 4), len(events)
    for after, got in zip((0, 3, 30), readers, strict=True):
        ids = [line for e in got for line in e.split(b"\n") if line.startswith(b"id: ")]
        assert got == events[after:], (after, len(got), ids[:5], ids[-5:])


async def test_a_catchup_read_after_many_small_entries_stays_near_catchup_bytes(
    tier_integration: None, redis: RedisServer
) -> None:
    """Attack: a run whose first 600 events are tiny (each its own stream entry: written one
    by one, as a paced upstream's are) and whose next 16 are 250 KB each (each its own entry,
    under `ENTRY_BYTES` and `CATCHUP_BYTES`). A replay reads it as `follow_remote` does:
    `next_catchup_count` doubles the count while a batch holds at most `CATCHUP_BYTES` (256
    KiB), so over the tiny entries it reaches `READ_COUNT` (512), and the read after asks
    for 512 entries and gets every 250 KB entry in one `XRANGE` reply: the whole tail of the
    run, up to `resume_max_bytes` (4 MiB by default), buffered by Redis for one read.

    The docs (resumable-streams.md, F4): each catch-up read asks for one entry after a batch
    over 256 KiB, and what reads make Redis buffer is about (`RUN_CATCHUP_READS` + followed
    runs) x the largest entry (here 250 KB: ~1 MB for the 4 slots of the gate).
    Measured (9ca2a97): 10 reads; the largest batch held 4.0 MB (all 16 big entries, asked
    with COUNT 512), 15 times `CATCHUP_BYTES`. With 4 such reads in the gate at once, ~16 MB
    where the bound says ~1 MB (still within 4 x `resume_max_bytes`; the follower's
    catch-up count grows the same way). Not taken past `maxmemory` here.
    Expected: no catch-up read returns more than about `CATCHUP_BYTES` plus one entry (e.g.
    the count bounded by bytes, not only by the last batch: XRANGE cannot limit bytes, so a
    count that grows only while the entries read stay small, and shrinks at once, does not
    help; reading one entry at a time once entries are not tiny does)."""
    options = RedisOptions(url=redis.url, op_timeout=5.0)
    backend = RedisBackend(make_client(options), op_timeout=5.0)
    store = RedisRunStore(backend, backend, "")
    run_id = "B" * 22
    try:
        seq = 0
        for _ in range(600):
            seq += 1
            await store.append(run_id, [(seq, f"data: {seq}\nid: {seq}\n\n".encode())], 1)
        for _ in range(16):
            seq += 1
            big = b"data: " + b"z" * 250_000 + f"\nid: {seq}\n\n".encode()
            await store.append(run_id, [(seq, big)], 1)
        pos, count, largest, reads = 0, 1, 0, 0
        while True:
            entries = await store.range_after(run_id, pos, count, app_id="shop", client="c")
            if not entries:
                break
            reads += 1
            largest = max(largest, sum(len(entry.data or b"") for entry in entries))
            count = next_catchup_count(count, entries, READ_COUNT)
            pos = entries[-1].seq
        assert pos == seq
    finally:
        await backend.close()
    assert largest <= CATCHUP_BYTES + 260_000, (
        f"replay of 600 tiny + 16 x 250 KB entries in {reads} reads: the largest batch held "
        f"{largest / 1e6:.1f} MB (CATCHUP_BYTES {CATCHUP_BYTES / 1e6:.2f} MB)"
    )


class TickingBigEventsUpstream(SseUpstream):
    """`shop`'s upstream: one ~4.1 MB event at each of `ticks` wall-clock ticks 1 s apart from
    `start` (monotonic, shared by every run: all runs write at once), then the end."""

    def __init__(self, start: float, ticks: int) -> None:
        self.start = start
        self.ticks = ticks

    async def write_events(self, response: web.StreamResponse) -> None:
        for tick in range(self.ticks):
            await asyncio.sleep(max(0.0, self.start + tick - time.monotonic()))
            await response.write(f"data: {tick} ".encode() + b"t" * 4_100_000 + b"\n\n")


@pytest.fixture
def redis96(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("96mb", "noeviction") as server:
        yield server


async def test_followers_of_big_live_runs_buffer_within_the_documented_bound(
    tier_system: None, tmp_path: Path, redis96: RedisServer
) -> None:
    """Attack: `shop`'s owner starts 16 runs on replica A at once (2 sessions, 8 each: the
    per-session cap; all pass the budget check, their first event not there yet), whose
    upstream writes one ~4.1 MB event (within `resume_max_bytes`) every second, all runs at
    the same instant; each run's stream keeps its last entry (~66 MB for the 16). The owner
    follows each run on replica B (from 4 loopback addresses: 4 follows per address; B's
    share is 32 per application). At each tick B's 16 followers' `XREAD BLOCK`s wake with a
    4.1 MB reply each, at once, ungated: Redis buffers up to 16 x 4.1 MB of replies on top of
    the 16 streams.

    The docs bound what reads make Redis buffer by (`RUN_CATCHUP_READS` + followed runs) x
    the largest entry: here (4 + 16) x 4.1 MB = 78 MiB.
    HOLDS (passes on 9ca2a97) as far as the bound goes: Redis's client buffers
    (`mem_clients_normal`, polled every 5 ms, the pump's `XADD` query buffers included)
    peaked at 20.4-20.7 MiB (3 runs). Not shown: that the followers take Redis past
    `maxmemory`. `used_memory` peaked at 86-102 MiB of 96 MiB over 8 runs (past it in 3; once
    a run's end was refused, OOM, and its followers got `run_orphaned`; `other`'s users got
    a 503 in 2), but without followers the runs end `run_limit_reached` at their second tick
    (nobody reads), so there is no like-for-like control; and the docs size Redis at the
    budgets x 1.2 (154 MiB for two applications), which 96 MiB is not. Note the bound's
    default: (4 + 64 follow connections) x 4 MiB = 272 MiB per replica."""
    async with AsyncExitStack() as stack:
        start = time.monotonic() + 3.0
        shop_url, other_url = await start_upstreams(
            stack, TickingBigEventsUpstream(start, 8).app(), CountingUpstream(3, 0.001).app()
        )
        env = redis_runs_env(
            tmp_path,
            redis96.url,
            f'[apps.shop]\nupstream = "{shop_url}"\nresumable = true\n'
            f'[apps.other]\nupstream = "{other_url}"\nresumable = true\n',
        )
        with GatewayProcess(env) as a, GatewayProcess(env) as b:
            jars = [aiohttp.CookieJar(unsafe=True) for _ in range(2)]
            owners = [aiohttp.ClientSession(cookie_jar=jar) for jar in jars]
            for owner in owners:
                stack.push_async_callback(owner.close)

            async def start_run(j: int) -> str:
                async with owners[j // 8].post(
                    f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "x"}
                ) as response:
                    assert response.status == 200, response.status
                    run_id = response.headers.get("X-Run-Id")
                    assert run_id is not None, "not resumable"
                    response.close()
                    return run_id

            # One run of each session first: it gives the session its conversation (concurrent
            # first requests would each make their own).
            first = [await start_run(0), await start_run(8)]
            rest = await asyncio.gather(*(start_run(j) for j in range(16) if j % 8))
            run_ids = [first[0], *rest[:7], first[1], *rest[7:]]
            followers = []
            for k in range(4):
                connector = aiohttp.TCPConnector(local_addr=(f"127.0.0.{2 + k}", 0))
                for jar in jars:
                    session = aiohttp.ClientSession(
                        cookie_jar=jar, connector=connector, connector_owner=False
                    )
                    stack.push_async_callback(session.close)
                    followers.append(session)
                stack.push_async_callback(connector.close)
            statuses: dict[int, int] = {}
            errors: list[str] = []

            async def follow(j: int) -> None:
                session = followers[(j // 4) * 2 + j // 8]
                async with session.get(
                    f"{b.url}/apps/shop/runs/{run_ids[j]}", headers={"Last-Event-ID": "0"}
                ) as response:
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    body = await asyncio.wait_for(response.read(), 30)
                    errors.extend(
                        e.decode()[:80] for e in body.split(b"\n\n") if e.startswith(b"event: err")
                    )

            peak = clients_peak = 0
            polling = True

            def poll() -> None:
                nonlocal peak, clients_peak
                watcher = redis96.client()
                while polling:
                    memory = watcher.info("memory")
                    peak = max(peak, int(memory["used_memory"]))
                    clients_peak = max(clients_peak, int(memory["mem_clients_normal"]))
                    time.sleep(0.005)

            watcher = asyncio.get_running_loop().run_in_executor(None, poll)
            others: dict[tuple[int, bool], int] = {}
            try:
                await asyncio.gather(
                    *(follow(j) for j in range(16)),
                    other_users(b.url, start + 8.5, others),
                )
            finally:
                polling = False
                await watcher
    mib = 2**20
    assert statuses == {200: 16}, statuses
    bound = (4 + 16) * 4_100_000
    assert clients_peak <= bound, (
        f"16 followers on B of 16 live shop runs writing 4.1 MB each per second: Redis's "
        f"client buffers peaked at {clients_peak / mib:.0f} MiB (the docs' bound "
        f"{bound / mib:.0f} MiB), used_memory at {peak / mib:.0f} MiB"
    )
