"""Failover with real Redis Sentinel (`redis+sentinel://`), and READONLY on a plain `redis://`.

- The primary is SIGKILLed under a light load: the same gateway process follows the promoted
  replica by itself; failed requests are fast 503s (never hangs, never 500s); the error window
  is measured, printed (`pytest -s`) and must stay bounded.
- A coordinated failover (`SENTINEL FAILOVER`) demotes a live primary: the gateway follows it too.
- `READONLY` from a demoted primary on a plain `redis://` URL: a fast 503, and the pooled
  connections are dropped so the next request reconnects (to whatever the name points at now).
- Start: Sentinel AUTH, an unknown master name, unreachable Sentinels.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from app.loadkit.ports import free_port
from app.sessions.ids import session_key
from tests.conftest import CSRF, GatewayFactory, GatewayProcessFactory
from tests.gateway_process import PROCESS_TEST_ENV, run_gateway_to_exit
from tests.redis_server import RedisServer
from tests.redis_topologies import GatewayHttp, Reply, SentinelTopology, command, wait_until

pytestmark = pytest.mark.redis_server

PREFIX = "agent:sess:"
OP_TIMEOUT = float(PROCESS_TEST_ENV["REDIS_OP_TIMEOUT_SECONDS"])
# A PATCH is two store operations (GETEX, then SET XX), each under the per-operation deadline.
SLOWEST_ANSWER = 2 * OP_TIMEOUT + 1.5
ERROR_WINDOW_BOUND = 20.0  # generous: with down-after 500 ms the measured window is a few seconds


@pytest.fixture
def sentinel() -> Iterator[SentinelTopology]:
    with SentinelTopology(password="data-pw") as topology:
        yield topology


def env_for(url: str, **more: str) -> dict[str, str]:
    return {"SESSION_STORE": "redis", "REDIS_URL": url, "REDIS_PREFIX": PREFIX, **more}


@dataclass
class LoadRun:
    replies: list[Reply]
    event_at: float

    def after_event(self) -> list[Reply]:
        return [r for r in self.replies if r.started + r.seconds >= self.event_at]

    def failures(self) -> list[Reply]:
        return [r for r in self.after_event() if r.status != 200]

    def error_window(self) -> float:
        """From the event to the end of the last failed request (0 when none failed)."""
        failures = self.failures()
        return max((r.started + r.seconds for r in failures), default=self.event_at) - (
            self.event_at
        )

    def summary(self, what: str) -> str:
        after = self.after_event()
        slowest = max((r.seconds for r in after), default=0.0)
        return (
            f"{what}: error window {self.error_window():.2f}s, {len(self.failures())} of "
            f"{len(after)} requests failed after it, slowest answer {slowest:.2f}s"
        )


async def run_load_across(
    http: GatewayHttp,
    trigger: Callable[[], None],
    done: Callable[[], bool],
    until_ok: int = 30,
) -> LoadRun:
    """Two workers, each alternating GET and PATCH on its own session every ~50 ms.
    `trigger()` runs once the load is going; the run ends once `done()` (e.g. "Sentinel names
    a new primary") and then `until_ok` consecutive 200s have come in (or after 40 s)."""
    replies: list[Reply] = []
    sids: list[str] = []
    for _ in range(2):
        created = await http.patch({"i": 0})
        assert created.status == 200 and created.sid is not None
        sids.append(created.sid)
    stop = asyncio.Event()

    async def worker(sid: str) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            replies.append(await (http.patch({"i": i}, sid=sid) if i % 2 else http.get(sid)))
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(worker(sid)) for sid in sids]
    try:
        await asyncio.sleep(0.5)
        event_at = time.monotonic()
        await asyncio.to_thread(trigger)
        deadline = event_at + 40
        while not await asyncio.to_thread(done) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        done_at = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            recent = [r for r in replies if r.started > done_at]
            tail = recent[-until_ok:]
            if len(tail) == until_ok and all(r.status == 200 for r in tail):
                break
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return LoadRun(replies=replies, event_at=event_at)


def moved_on(sentinel: SentinelTopology, old: RedisServer) -> Callable[[], bool]:
    """True once the Sentinels name a primary other than `old`."""
    return lambda: sentinel.primary_port() != old.port


def assert_failover_behaviour(run: LoadRun) -> None:
    for reply in run.failures():
        assert reply.status == 503, reply
        assert reply.error_code == "session_store_unavailable", reply
        assert "Retry-After" in reply.headers
    slowest = max(r.seconds for r in run.after_event())
    assert slowest < SLOWEST_ANSWER, f"a request took {slowest:.2f}s: no hangs allowed"
    tail = run.replies[-20:]
    assert all(r.status == 200 for r in tail), [r.status for r in tail]
    assert run.error_window() < ERROR_WINDOW_BOUND, run.summary("failover")


async def test_primary_killed_under_load_the_gateway_follows_the_new_primary(
    sentinel: SentinelTopology, gateway_process: GatewayProcessFactory
) -> None:
    gateway = gateway_process(env_for(sentinel.url))
    old_primary = sentinel.current_primary()
    async with GatewayHttp(gateway.url) as http:
        anchor = await http.patch({"kept": "across the failover"})
        assert anchor.status == 200 and anchor.sid is not None
        # Replication is asynchronous: only what the replica has acknowledged survives a crash.
        sentinel.wait_replica_caught_up()

        run = await run_load_across(http, old_primary.kill, moved_on(sentinel, old_primary))
        print("\n" + run.summary("Sentinel failover after SIGKILL of the primary"))
        assert_failover_behaviour(run)

        assert sentinel.primary_port() != old_primary.port
        reply = await http.get(anchor.sid)
        assert reply.status == 200 and reply.body == {"data": {"kept": "across the failover"}}
        assert await http.ready() == 200
    assert gateway.returncode is None  # recovered without a restart


async def test_coordinated_failover_demotes_a_live_primary_and_the_gateway_follows(
    sentinel: SentinelTopology, gateway_process: GatewayProcessFactory
) -> None:
    gateway = gateway_process(env_for(sentinel.url))
    old_primary = sentinel.current_primary()

    def failover() -> None:
        with contextlib.closing(sentinel.sentinels[0].client()) as client:
            command(client, "SENTINEL", "FAILOVER", sentinel.master_name)

    async with GatewayHttp(gateway.url) as http:
        run = await run_load_across(http, failover, moved_on(sentinel, old_primary))
        print("\n" + run.summary("Sentinel coordinated failover (SENTINEL FAILOVER)"))
        assert_failover_behaviour(run)

        new_port = sentinel.primary_port()
        assert new_port != old_primary.port
        wait_until(
            lambda: old_primary.client().info("replication")["role"] == "slave",
            10,
            "the old primary to become a replica",
        )
        # New writes land on the new primary (the demoted one would answer READONLY).
        created = await http.patch({"after": "failover"})
        assert created.status == 200 and created.sid is not None
        key = session_key(PREFIX, "demo", created.sid)
        with contextlib.closing(sentinel.server_on(new_port).client()) as client:
            assert client.exists(key) == 1
    assert gateway.returncode is None


async def test_readonly_from_a_demoted_plain_redis_is_a_fast_503_and_reconnects(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """`redis://` behind a name that moves on failover: a connection still open to the demoted
    node gets READONLY; the gateway answers 503 at once and drops its idle connections, so
    the next request connects afresh instead of hitting the demoted node forever."""
    gateway = await gateway_factory("redis", REDIS_URL=redis_server.url)
    client = gateway.client
    resp = await client.patch("/apps/demo/session", json={"a": 1}, headers=CSRF)
    assert resp.status == 200
    assert "agent-bff" in redis_server.client_names()

    with RedisServer() as new_primary, contextlib.closing(redis_server.client()) as admin:
        admin.replicaof("127.0.0.1", new_primary.port)
        wait_until(
            lambda: admin.info("replication").get("master_link_status") == "up",
            10,
            "the demoted node to replicate",
        )
        started = time.monotonic()
        resp = await client.get("/apps/demo/session")
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "session_store_unavailable"
        assert time.monotonic() - started < 2.0
        # Our pooled connections to the demoted node are gone.
        assert "agent-bff" not in redis_server.client_names()

        admin.replicaof("NO", "ONE")
        resp = await client.get("/apps/demo/session")
        assert resp.status == 200


def test_start_authenticates_to_sentinels_and_names_a_wrong_master(
    gateway_process: GatewayProcessFactory,
) -> None:
    with SentinelTopology(sentinels=1, sentinel_password="sentinel-pw") as topology:
        url = topology.url
        ok = env_for(url, REDIS_SENTINEL_PASSWORD="sentinel-pw")
        code, stderr, _ = run_gateway_to_exit(
            {**ok, "REDIS_URL": url.replace(f"/{topology.master_name}/", "/nope/")}
        )
        assert code == 1, stderr
        assert "No master found for 'nope'" in stderr, stderr
        assert "REDIS_URL=redis+sentinel://127.0.0.1:" in stderr

        code, stderr, _ = run_gateway_to_exit(env_for(url))  # no REDIS_SENTINEL_PASSWORD
        assert code == 1, stderr
        assert "REDIS_SENTINEL_PASSWORD" in stderr  # the hint

        gateway = gateway_process(ok)
        assert gateway.get_status("/readyz") == 200
        assert gateway.stop() == 0
        assert "sentinel-pw" not in gateway.stderr + stderr


@pytest.mark.system
def test_start_fails_fast_when_no_sentinel_answers() -> None:
    url = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/sessions/0"
    code, stderr, seconds = run_gateway_to_exit(env_for(url))
    assert code == 1, stderr
    assert "No master found for 'sessions'" in stderr, stderr
    assert seconds < 10
