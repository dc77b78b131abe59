"""Sixth attack on resumable runs in Redis (branch attack-gate-9, after bae4abf): the catch-up
gate's turns per client address and its "fail every waiter" rule, the budget ledger's
`NEAR_BUDGET_SHARE`, and `CATCHUP_RANGE`'s batches of up to 16 entries.

Each test plays application `shop`'s hostile owner (its own upstream, its own browser clients)
against real gateway processes and a real redis-server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer
from tests.runs_helpers import (
    CSRF,
    BySizeUpstream,
    OneBigEventUpstream,
    SseUpstream,
    budget_counted,
    redis_at,
    redis_runs_env,
    replay,
    runs_back_to_back,
    start_run_of,
    start_upstreams,
)

pytestmark = pytest.mark.redis_server


@pytest.fixture
def redis(tier_integration: None) -> Iterator[RedisServer]:
    with redis_at("512mb", "noeviction") as server:
        yield server


async def _fill_budget(
    tmp_path: Path, redis: RedisServer, *, replicas: int, clients: int, seconds: float
) -> tuple[int, list[tuple[int, int]]]:
    """`clients` clients per replica starting 1 MiB runs back to back for `seconds`, budget
    16 MiB: (bytes Redis counts for `shop`, (kept, started) per replica)."""
    budget = 16 * 1024 * 1024
    async with AsyncExitStack() as stack:
        (shop_url,) = await start_upstreams(stack, OneBigEventUpstream(1024 * 1024).app())
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{shop_url}"\nresumable = true\n'
            f"resume_window_seconds = 30\nresume_redis_budget_bytes = {budget}\n",
        )
        with ExitStack() as processes:
            gateways = [processes.enter_context(GatewayProcess(env)) for _ in range(replicas)]
            kept: list[list[bool]] = [[] for _ in gateways]
            until = time.monotonic() + seconds
            await asyncio.gather(
                *(
                    runs_back_to_back(gateway.url, until, kept[i])
                    for i, gateway in enumerate(gateways)
                    for _ in range(clients)
                )
            )
            await asyncio.sleep(1.0)  # the last costs flushed
            counted = budget_counted(redis, "shop")
    return counted, [(sum(k), len(k)) for k in kept]


BUDGET = 16 * 1024 * 1024


async def test_three_replicas_one_client_each_stay_within_the_claimed_overshoot(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: attacks5's budget flood (runs of one 1 MiB event, ~1.34 MiB of budget each,
    back to back, 16 MiB budget) on 3 replicas, one client each, 3 s. Claim (budget.py): each
    other replica adds at most ~`NEAR_BUDGET_SHARE` (0.25) of the budget: <= 1.5x here.
    Did not break it (passing test): measured (bae4abf, 3 runs) 17.4-18.8 MiB of 16 MiB
    (1.09-1.17x), 13-14 runs kept of ~1,000."""
    counted, per_replica = await _fill_budget(tmp_path, redis, replicas=3, clients=1, seconds=3.0)
    message = (
        f"3 replicas x 1 client: (kept, started) {per_replica}; Redis counts "
        f"{counted / 2**20:.1f} MiB of {BUDGET / 2**20:.0f} MiB ({counted / BUDGET:.2f}x)"
    )
    print(message)
    assert counted <= BUDGET * 1.5, message


async def test_three_replicas_four_clients_each_stay_within_the_claimed_overshoot(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: the same with 4 clients per replica (12 runs in flight at once). Near the
    budget each check reads Redis and each end is counted at once, but a run started on one
    replica is invisible to the others until its end's `INCRBY`: each replica's checks see
    Redis without the other replicas' runs in flight (up to 8 here, ~10.7 MiB).

    Measured (bae4abf, 2 shared cores, 4 runs): kept 21-26 of ~1,100-1,600 runs; Redis counts
    29.5-34.8 MiB of 16 MiB (1.84-2.18x), over the claimed 1.5x for 3 replicas. For
    comparison: 1 replica x 4 or x 12 clients: 16.1 MiB (1.00x, exact); 2 replicas x 4
    clients: 22.8 MiB (1.42x, over the claimed 1.25x); 3 replicas x 1 client (the test above,
    passing): 17.4-18.8 MiB (1.09-1.17x).
    Expected: within 1 + 0.25 x 2 = 1.5x of the budget (e.g. near the budget a run's
    assumed cost reserved in Redis at its start, and released or corrected at its end).
    Fixed (issue 17, session 8): near the budget each replica publishes its runs in flight
    in Redis and checks see the others' (`BudgetLedger.admit`, `BUDGET_RESERVE`), and a run
    counts from its start as its application's typical run: 1.17-1.26x in 3 runs (flight
    alone: 1.09-1.67x)."""
    counted, per_replica = await _fill_budget(tmp_path, redis, replicas=3, clients=4, seconds=3.0)
    message = (
        f"3 replicas x 4 clients: (kept, started) {per_replica}; Redis counts "
        f"{counted / 2**20:.1f} MiB of {BUDGET / 2**20:.0f} MiB ({counted / BUDGET:.2f}x)"
    )
    print(message)
    assert counted <= BUDGET * 1.5, message


@pytest.mark.serial
async def test_many_addresses_of_one_application_do_not_cut_another_applications_replays(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: `shop`'s owner (behind the trusted proxy) replays its 8 ended 4.1 MB runs from
    64 addresses at once (2 replays each: 128 in flight, each address its own turn in the
    gate), loading the gateway; `other`'s user replays its 12-entry run (300 KB entries) 4
    times meanwhile. Applications alternate first in the gate, so `other` should wait about
    one read; but a read of `shop`'s that fails inside the gate (its 1 s deadline under load)
    fails every waiter, `other`'s included.
    Expected: `other`'s replays whole, none cut with `run_store_unavailable`.
    Did not break it (passing test): measured (bae4abf, one replica) `other`'s replay 0.02 s
    alone, 0.70-1.12 s during the flood (~324 hostile replays answered, the rest refused by
    the reader caps), none cut: the applications alternate first, as claimed (slower ~50x,
    from the gateway's CPU, not the gate)."""
    async with AsyncExitStack() as stack:
        shop_url, other_url = await start_upstreams(
            stack, BySizeUpstream().app(), BySizeUpstream().app()
        )
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{shop_url}"\nresumable = true\n'
            f'[apps.other]\nupstream = "{other_url}"\nresumable = true\n',
        )
        env["TRUSTED_PROXIES"] = "127.0.0.1/32"
        with GatewayProcess(env) as gateway:
            hostile = aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True),
                connector=aiohttp.TCPConnector(limit=300),
            )
            stack.push_async_callback(hostile.close)
            user = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            stack.push_async_callback(user.close)
            runs = [
                await start_run_of(
                    hostile, gateway.url, "shop", address="203.0.113.1", message="big"
                )
                for _ in range(8)
            ]
            user_ip = "198.51.100.9"
            user_run = await start_run_of(
                user, gateway.url, "other", address=user_ip, message="small"
            )
            await asyncio.sleep(0.5)
            alone = min(
                [
                    (await replay(user, gateway.url, "other", user_run, address=user_ip))[0]
                    for _ in range(2)
                ]
            )
            flooding = True
            replays = 0
            cut = 0

            async def flood(run_id: str, address: str) -> None:
                nonlocal replays, cut
                while flooding:
                    try:
                        _, body = await replay(
                            hostile, gateway.url, "shop", run_id, address=address
                        )
                    except (AssertionError, aiohttp.ClientError, TimeoutError):
                        cut += 1
                        continue
                    replays += 1
                    cut += b"event: error" in body

            tasks = [
                asyncio.create_task(flood(runs[(n + k) % 8], f"203.0.{n}.{k + 1}"))
                for n in range(64)
                for k in range(2)
            ]
            failures: list[str] = []
            during: list[float] = []
            try:
                await asyncio.sleep(1.5)
                for _ in range(4):
                    took, body = await replay(user, gateway.url, "other", user_run, address=user_ip)
                    during.append(took)
                    if b"event: error" in body or body.count(b"\n\n") != 12:
                        failures.append(body[-160:].decode(errors="replace"))
            finally:
                flooding = False
                await asyncio.wait_for(asyncio.gather(*tasks), 40)
            stderr = gateway.stderr
    message = (
        f"other's replay alone {alone:.2f} s; during shop's 128 replays from 64 addresses "
        f"({replays} answered, {cut} cut): {[round(d, 2) for d in during]} s, "
        f"{len(failures)} of 4 cut: {failures}; gateway stderr mentions 'catch-up read "
        f"failed' {stderr.count('catch-up read failed')}x"
    )
    print(message)
    assert not failures, message


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (`VmHWM`), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


class TinyThenBigUpstream(SseUpstream):
    """32 tiny events (one entry each, paced), then 16 events of 4,000,000 bytes (one entry
    each): a catch-up read of count 32 reads one tiny entry, then one `XRANGE` of 16 entries,
    all big."""

    async def write_events(self, response: web.StreamResponse) -> None:
        for i in range(32):
            await response.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.01)
        for i in range(16):
            await response.write(f"data: {i} ".encode() + b"B" * 4_000_000 + b"\n\n")
            await asyncio.sleep(0.02)


async def test_a_catchup_read_holds_about_one_replys_bytes_in_redis(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: `CATCHUP_RANGE` grows its `XRANGE` batch to 16 entries over tiny entries and
    only then sees their sizes: a run of 32 tiny entries then 16 entries of 4 MB (the
    application allows 80 MiB per run) makes one catch-up read pull 16 x 4 MB = 64 MB into
    the script (the fake client's reply, then Lua strings), to return ~4 MB. Lua's heap is
    outside `maxmemory`. Measured: the redis-server's peak RSS before and after one replay.
    Expected: one catch-up read makes Redis hold about `CATCHUP_BYTES` + one entry (its
    reply), here under 24 MB more peak RSS than the writes of the run did.

    Measured (bae4abf, one replay, 2 replicas: written on A, replayed on B): redis-server peak
    RSS 81-89 -> 220-224 MiB (2 runs: +135-139 MiB for one read returning ~4 MB: the 64 MB
    `XRANGE` reply in the script's client and its copy as Lua strings), `used_memory_lua`
    61.1 MiB afterwards (the garbage stays until Lua's GC), and the script ran 272-329 ms,
    blocking Redis for every other client (sessions included). With the default
    `resume_max_bytes` (4 MiB) a run's stream
    holds ~4 MiB at most, so this needs an application allowed large runs (here 80 MiB)."""
    async with AsyncExitStack() as stack:
        (shop_url,) = await start_upstreams(stack, TinyThenBigUpstream().app())
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{shop_url}"\nresumable = true\n'
            f"resume_max_bytes = {80 * 2**20}\nresume_redis_budget_bytes = {256 * 2**20}\n",
        )
        with GatewayProcess(env) as a, GatewayProcess(env) as b:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                async with http.post(
                    f"{a.url}/apps/shop/agent/chat", headers=CSRF, json={"message": "x"}
                ) as response:
                    await response.read()
                    run_id = response.headers["X-Run-Id"]
                await asyncio.sleep(0.5)
                client = redis.client()
                client.config_set("slowlog-log-slower-than", 0)
                client.slowlog_reset()
                before = _peak_rss(redis.pid)
                began = time.monotonic()
                async with http.get(
                    f"{b.url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": "0"}
                ) as response:
                    body = await asyncio.wait_for(response.read(), 30)
                took = time.monotonic() - began
                after = _peak_rss(redis.pid)
                lua = int(client.info("memory").get("used_memory_lua", 0))
                slow = [
                    int(e["duration"])
                    for e in client.slowlog_get(128)
                    if b"EVAL" in bytes(e["command"])[:8].upper()
                ]
                client.close()
    events = body.count(b"\n\n")
    message = (
        f"replay of 32 tiny + 16 x 4 MB entries: {events} events in "
        f"{took:.2f} s; redis peak RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB "
        f"(+{(after - before) / 2**20:.0f}); used_memory_lua {lua / 2**20:.1f} MiB after; "
        f"longest catch-up script {max(slow, default=0) / 1000:.1f} ms"
    )
    print(message)
    assert after - before <= 24 * 2**20, message


class TinyThenBigOrSmallUpstream(TinyThenBigUpstream):
    """`shop`'s runs as `TinyThenBigUpstream`; a request whose message is `small`: 12 events
    of 300 KB (`other`'s user)."""

    small = False

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.small = (await request.json()).get("message") == "small"
        return await super().chat(request)

    async def write_events(self, response: web.StreamResponse) -> None:
        if not self.small:
            await super().write_events(response)
            return
        for i in range(12):
            await response.write(f"data: {i} ".encode() + b"s" * 300_000 + b"\n\n")
            await asyncio.sleep(0.005)


@pytest.mark.serial
async def test_one_applications_slow_catchup_reads_do_not_fail_another_applications_reads(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: `shop` (80 MiB per run allowed) has one ended run of 32 tiny then 16 x 4 MB
    entries (see the test above: one catch-up read of it runs ~0.3 s in Redis). Its owner
    replays it from 8 addresses at once, in a loop: the gate's 4 slots hold such reads, which
    Redis runs one after the other, so the last of 4 waits ~1 s in Redis and misses its
    `REDIS_OP_TIMEOUT_SECONDS` (1 s here, 2 s by default: two replicas do it). A read failing
    inside the gate fails every waiter, so `other`'s user (its own 12-entry run, its own
    address), queued behind, gets `run_store_unavailable` though Redis answers.
    Expected: a read of one application timing out does not fail another application's
    waiters (e.g. fail only on a connection error, or only the failing application's), and
    one application's catch-up read does not block Redis for ~0.3 s (the previous test): all
    6 of `other`'s replays whole.

    Measured (bae4abf, one replica, 2 shared cores, 2 hostile runs, 12 loops, 4 test runs):
    `other`'s replay took 0.01-0.02 s alone; during the flood 0.5-2.5 s, and 2, 6, 5 of 6
    replays were cut (another run, with 8 loops and 4 replays: 2 of 4, and one pass): some
    mid-stream with `run_store_unavailable` logged as "reading failed (catch-up read failed:
    TimeoutError: no answer within the 1 s deadline" (the fail-every-waiter rule: shop's read
    timed out), some by `other`'s own catch-up read missing its deadline, some 503 at the
    start ("session store unavailable: TimeoutError", Redis blocked by shop's scripts)."""
    async with AsyncExitStack() as stack:
        shop_url, other_url = await start_upstreams(
            stack, TinyThenBigUpstream().app(), TinyThenBigOrSmallUpstream().app()
        )
        env = redis_runs_env(
            tmp_path,
            redis.url,
            f'[apps.shop]\nupstream = "{shop_url}"\nresumable = true\n'
            f"resume_max_bytes = {80 * 2**20}\nresume_redis_budget_bytes = {256 * 2**20}\n"
            f'[apps.other]\nupstream = "{other_url}"\nresumable = true\n',
        )
        env["TRUSTED_PROXIES"] = "127.0.0.1/32"
        with GatewayProcess(env) as gateway:
            hostile = aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True),
                connector=aiohttp.TCPConnector(limit=100),
            )
            stack.push_async_callback(hostile.close)
            user = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            stack.push_async_callback(user.close)
            runs = [
                await start_run_of(
                    hostile, gateway.url, "shop", address="203.0.113.1", message="big"
                )
                for _ in range(2)
            ]
            user_ip = "198.51.100.9"
            user_run = await start_run_of(
                user, gateway.url, "other", address=user_ip, message="small"
            )
            await asyncio.sleep(0.5)
            alone = min(
                [
                    (await replay(user, gateway.url, "other", user_run, address=user_ip))[0]
                    for _ in range(2)
                ]
            )
            flooding = True
            replays = 0
            cut = 0

            async def flood(address: str, run: str) -> None:
                nonlocal replays, cut
                while flooding:
                    try:
                        _, body = await replay(hostile, gateway.url, "shop", run, address=address)
                    except (AssertionError, aiohttp.ClientError, TimeoutError):
                        cut += 1
                        continue
                    replays += 1
                    cut += b"event: error" in body

            tasks = [
                asyncio.create_task(flood(f"203.0.113.{n + 1}", runs[n % 2])) for n in range(12)
            ]
            failures: list[str] = []
            during: list[float] = []
            try:
                await asyncio.sleep(1.0)
                for _ in range(6):
                    try:
                        took, body = await replay(
                            user, gateway.url, "other", user_run, address=user_ip
                        )
                    except AssertionError as err:
                        failures.append(f"status {err}")
                        continue
                    during.append(took)
                    if b"event: error" in body or body.count(b"\n\n") != 12:
                        failures.append(body[-120:].decode(errors="replace"))
            finally:
                flooding = False
                await asyncio.wait_for(asyncio.gather(*tasks), 40)
            stderr = gateway.stderr
    lines = [
        line.split("WARNING", 1)[-1][:220]
        for line in stderr.splitlines()
        if f"run {user_run}: reading failed" in line or "session store unavailable" in line
    ][-4:]
    message = (
        f"gateway warnings: {lines}; "
        f"other's replay alone {alone:.2f} s; during shop's 12 replay loops ({replays} whole, "
        f"{cut} cut): {[round(d, 2) for d in during]} s, {len(failures)} of 6 cut: {failures}"
    )
    print(message)
    assert not failures, message


@pytest.mark.serial
async def test_one_client_with_many_ipv6_prefixes_does_not_starve_another_user_of_its_app(
    tier_system: None, tmp_path: Path, redis: RedisServer
) -> None:
    """Attack: attacks5's same-application flood (8 ended 4.1 MB runs of `shop` replayed
    without pause), but the hostile client comes from 64 IPv6 /64 prefixes of one /56 (what
    one home connection gets), 2 replays each: 64 turns of `shop` in the gate against the
    other user's one. Expected (attacks5's bound): the other user's replay of its 12-entry run
    within 1 s + 3x its time alone, whole (e.g. turns by a coarser prefix, /48 or /56 for
    IPv6, or by session, or a bounded share per application's client rather than one turn per
    address).

    Measured (bae4abf, one replica, 2 shared cores, 3 test runs): the user's replay 0.01 s
    alone, 6.22-7.13 s during the flood (~650x; ~1,420 hostile replays answered, ~8,500
    refused by the reader caps and retried), whole but as slow as attacks5's one-address
    flood before the fix (7.3-10.3 s). attacks5's one-address test passes on bae4abf: the
    turns per address hold against one address, not against one client's 64 addresses."""
    async with AsyncExitStack() as stack:
        (shop_url,) = await start_upstreams(stack, BySizeUpstream().app())
        env = redis_runs_env(
            tmp_path, redis.url, f'[apps.shop]\nupstream = "{shop_url}"\nresumable = true\n'
        )
        env["TRUSTED_PROXIES"] = "127.0.0.1/32"
        with GatewayProcess(env) as gateway:
            hostile = aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True),
                connector=aiohttp.TCPConnector(limit=300),
            )
            stack.push_async_callback(hostile.close)
            user = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
            stack.push_async_callback(user.close)
            runs = [
                await start_run_of(
                    hostile, gateway.url, "shop", address="2001:db8:0:1::1", message="big"
                )
                for _ in range(8)
            ]
            user_ip = "198.51.100.9"
            user_run = await start_run_of(
                user, gateway.url, "shop", address=user_ip, message="small"
            )
            await asyncio.sleep(0.5)
            alone = min(
                [
                    (await replay(user, gateway.url, "shop", user_run, address=user_ip))[0]
                    for _ in range(3)
                ]
            )
            flooding = True
            replays = 0
            refused = 0

            async def flood(run_id: str, address: str) -> None:
                nonlocal replays, refused
                while flooding:
                    try:
                        await replay(hostile, gateway.url, "shop", run_id, address=address)
                    except (AssertionError, aiohttp.ClientError, TimeoutError):
                        refused += 1
                        await asyncio.sleep(0.05)
                        continue
                    replays += 1

            tasks = [
                asyncio.create_task(flood(runs[(n + k) % 8], f"2001:db8:0:{n:x}::1"))
                for n in range(64)
                for k in range(2)
            ]
            failures: list[str] = []
            during: list[float] = []
            try:
                await asyncio.sleep(1.5)
                for _ in range(2):
                    try:
                        took, body = await replay(
                            user, gateway.url, "shop", user_run, address=user_ip
                        )
                    except AssertionError as err:
                        failures.append(f"status {str(err)[:40]}")
                        continue
                    during.append(took)
                    if b"event: error" in body or body.count(b"\n\n") != 12:
                        failures.append(body[-120:].decode(errors="replace"))
            finally:
                flooding = False
                await asyncio.wait_for(asyncio.gather(*tasks), 40)
    limit = 1 + 3 * alone
    message = (
        f"the user's replay: {alone:.2f} s alone; during 128 replays from 64 /64s ({replays} "
        f"answered, {refused} refused): {[round(d, 2) for d in during]} s, failed "
        f"{len(failures)}x {failures}; limit {limit:.1f} s"
    )
    print(message)
    assert not failures and max(during, default=99.0) <= limit, message
