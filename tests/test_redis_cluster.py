"""Sessions on a real 3-primary Redis Cluster (`redis+cluster://`), through `python -m app`.

- Sessions of many ids spread over every primary and read back through a second process.
- `MOVED` and `ASK` (a slot migrating under a live gateway) are followed by the client.
- A dead primary answers 503 for its own slots only; `/readyz` stays 200; the gateway recovers
  by itself when the node is back.
- The start check: a node down or a non-cluster server -> exit 1 with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator

import pytest

from app.sessions.ids import session_key
from tests.conftest import GatewayProcessFactory
from tests.gateway_process import PROCESS_TEST_ENV, run_gateway_to_exit
from tests.redis_server import RedisServer
from tests.redis_topologies import GatewayHttp, RedisClusterTopology, Reply, command, wait_until

pytestmark = pytest.mark.redis_server

PREFIX = "agent:sess:"
OP_TIMEOUT = float(PROCESS_TEST_ENV["REDIS_OP_TIMEOUT_SECONDS"])
SESSIONS = 60  # P(some primary gets none of 60 uniform keys) = 3 * (2/3)**60 ~ 1e-10


@pytest.fixture
def cluster() -> Iterator[RedisClusterTopology]:
    with RedisClusterTopology(3) as topology:
        yield topology


@pytest.fixture
def durable_cluster() -> Iterator[RedisClusterTopology]:
    """AOF with fsync always, so a killed and restarted primary still has its sessions."""
    with RedisClusterTopology(3, appendonly=True) as topology:
        yield topology


def env_for(url: str) -> dict[str, str]:
    return {"SESSION_STORE": "redis", "REDIS_URL": url, "REDIS_PREFIX": PREFIX}


async def create_sessions(http: GatewayHttp, count: int) -> dict[str, int]:
    """`count` new sessions through `http`: {session id: the `n` stored in it}."""
    sessions: dict[str, int] = {}
    for n in range(count):
        reply = await http.patch({"n": n})
        assert reply.status == 200, reply
        assert reply.sid is not None
        sessions[reply.sid] = n
    return sessions


def sessions_by_node(
    cluster: RedisClusterTopology, sessions: dict[str, int]
) -> dict[RedisServer, set[str]]:
    result: dict[RedisServer, set[str]] = {node: set() for node in cluster.nodes}
    for sid in sessions:
        result[cluster.node_for_key(session_key(PREFIX, "demo", sid))].add(sid)
    return result


async def test_sessions_spread_over_all_primaries_and_read_back_through_a_second_process(
    cluster: RedisClusterTopology, gateway_process: GatewayProcessFactory
) -> None:
    writer = gateway_process(env_for(cluster.url))
    reader = gateway_process(env_for(cluster.url))
    async with GatewayHttp(writer.url) as a, GatewayHttp(reader.url) as b:
        assert await a.ready() == 200
        assert await b.ready() == 200
        sessions = await create_sessions(a, SESSIONS)

        # Every key landed, in the spec's format, on the primary that owns its slot, and every
        # primary holds some.
        expected = {session_key(PREFIX, "demo", sid) for sid in sessions}
        per_node = cluster.keys_per_node()
        assert set().union(*per_node.values()) == expected
        assert all(per_node[node.port] for node in cluster.nodes), {
            port: len(keys) for port, keys in per_node.items()
        }
        for key in expected:
            assert key in per_node[cluster.node_for_key(key).port]

        # The other process reads each one back (and a write there is seen by the first).
        for sid, n in sessions.items():
            reply = await b.get(sid)
            assert reply.status == 200, reply
            assert reply.body == {"data": {"n": n}}
        some_sid = next(iter(sessions))
        assert (await b.patch({"by": "b"}, sid=some_sid)).status == 200
        assert (await a.get(some_sid)).body["data"] == {"n": sessions[some_sid], "by": "b"}


async def test_moved_and_ask_are_followed_while_a_slot_migrates(
    cluster: RedisClusterTopology, gateway_process: GatewayProcessFactory
) -> None:
    gateway = gateway_process(env_for(cluster.url))
    async with GatewayHttp(gateway.url) as http:
        created = await http.patch({"v": 1})
        sid = created.sid
        assert sid is not None
        key = session_key(PREFIX, "demo", sid)
        assert (await http.get(sid)).status == 200  # the gateway has learned the slot map

        source = cluster.node_for_key(key)
        target = next(n for n in cluster.nodes if n is not source)
        slot = int(
            command(source.client(), "CLUSTER", "KEYSLOT", key)
        )  # same as redis.crc.key_slot
        source_id, target_id = cluster.node_id(source), cluster.node_id(target)
        with contextlib.closing(source.client()) as src, contextlib.closing(target.client()) as dst:
            # Half-way through a migration: the key already moved, the slot not yet -> the source
            # answers `ASK target` for it.
            command(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            command(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            moved = command(src, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", key)
            assert moved == b"OK"
            assert command(src, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
            assert command(dst, "CLUSTER", "COUNTKEYSINSLOT", slot) == 1
            reply = await http.get(sid)
            assert reply.status == 200 and reply.body == {"data": {"v": 1}}, reply
            reply = await http.patch({"v": 2}, sid=sid)
            assert reply.status == 200, reply

            # Migration finished: the source now answers `MOVED target`.
            for node in cluster.nodes:
                with contextlib.closing(node.client()) as client:
                    command(client, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
            reply = await http.get(sid)
            assert reply.status == 200 and reply.body == {"data": {"v": 2}}, reply
            assert (await http.patch({"v": 3}, sid=sid)).status == 200
            assert command(src, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
            assert cluster.node_for_key(key) is target
            with contextlib.closing(target.client()) as fresh:  # no ASKING needed any more
                assert json.loads(fresh.get(key) or b"{}")["data"] == {"v": 3}


async def test_a_dead_primary_fails_only_its_slots_and_the_gateway_recovers(
    durable_cluster: RedisClusterTopology, gateway_process: GatewayProcessFactory
) -> None:
    cluster = durable_cluster
    gateway = gateway_process(env_for(cluster.url))
    async with GatewayHttp(gateway.url) as http:
        sessions = await create_sessions(http, 30)
        victim, on_victim = max(
            sessions_by_node(cluster, sessions).items(), key=lambda item: len(item[1])
        )
        assert len(on_victim) < len(sessions)

        victim.kill()
        for sid, n in sessions.items():
            reply = await http.get(sid)
            if sid in on_victim:
                assert reply.status == 503, reply
                assert reply.error_code == "session_store_unavailable"
                assert "Retry-After" in reply.headers
                assert reply.seconds < 2.5, reply  # fast, never a hang
            else:
                assert reply.status == 200 and reply.body == {"data": {"n": n}}, reply
        # Other primaries serve: keep this replica in the load balancer.
        assert await http.ready() == 200

        victim.restart()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            replies = [await http.get(sid) for sid in on_victim]
            if all(r.status == 200 for r in replies):
                break
        for sid in on_victim:
            assert (await http.get(sid)).body == {"data": {"n": sessions[sid]}}
    assert gateway.returncode is None  # the same process throughout


async def test_a_frozen_primary_answers_503_within_the_deadline_for_its_slots_only(
    cluster: RedisClusterTopology, gateway_process: GatewayProcessFactory
) -> None:
    """SIGSTOP: connections hang instead of failing; the per-operation deadline still holds."""
    gateway = gateway_process(env_for(cluster.url))
    async with GatewayHttp(gateway.url) as http:
        sessions = await create_sessions(http, 20)
        # The primary holding the fewest (but some) of them: each of those waits out a deadline.
        victim, on_victim = min(
            ((node, sids) for node, sids in sessions_by_node(cluster, sessions).items() if sids),
            key=lambda item: len(item[1]),
        )
        assert len(on_victim) < len(sessions)
        victim.pause()
        try:
            for sid, n in sessions.items():
                reply = await http.get(sid)
                assert reply.seconds < OP_TIMEOUT + 1.0, reply
                if sid in on_victim:
                    assert reply.status == 503, reply
                else:
                    assert reply.status == 200 and reply.body == {"data": {"n": n}}, reply
        finally:
            victim.resume()
        for sid, n in sessions.items():
            assert (await http.get(sid)).body == {"data": {"n": n}}


async def test_a_replica_takes_over_a_dead_primary_and_the_gateway_follows(
    gateway_process: GatewayProcessFactory,
) -> None:
    """3 primaries with a replica each: Redis promotes the replica of a killed primary after
    `cluster-node-timeout` (1 s here); the same gateway process picks the new slot owner up."""
    with RedisClusterTopology(3, replicas=1) as cluster:
        gateway = gateway_process(env_for(cluster.url))
        async with GatewayHttp(gateway.url) as http:
            sessions = await create_sessions(http, 30)
            wait_until(cluster.replicas_caught_up, 10, "the replicas to catch up")
            victim, on_victim = max(
                sessions_by_node(cluster, sessions).items(), key=lambda item: len(item[1])
            )
            killed_at = time.monotonic()
            victim.kill()
            failures: list[Reply] = []
            while True:
                replies = [await http.get(sid) for sid in on_victim]
                failures += [r for r in replies if r.status != 200]
                if all(r.status == 200 for r in replies):
                    break
                assert time.monotonic() - killed_at < 30, "no replica took over"
                await asyncio.sleep(0.05)
            window = max((r.started + r.seconds for r in failures), default=killed_at) - killed_at
            print(
                f"\nCluster replica promotion after SIGKILL of a primary: error window "
                f"{window:.2f}s for {len(on_victim)} sessions on it, {len(failures)} failed "
                f"requests, slowest {max((r.seconds for r in failures), default=0):.2f}s"
            )
            for reply in failures:
                assert reply.status == 503 and reply.error_code == "session_store_unavailable"
                assert reply.seconds < OP_TIMEOUT + 1.0, reply
            for sid, n in sessions.items():
                reply = await http.get(sid)
                assert reply.status == 200 and reply.body == {"data": {"n": n}}, reply
            assert all(
                cluster.node_for_key(session_key(PREFIX, "demo", sid)) is not victim
                for sid in on_victim
            )
        assert gateway.returncode is None


@pytest.mark.system
def test_start_fails_fast_when_a_primary_is_down(cluster: RedisClusterTopology) -> None:
    cluster.nodes[1].kill()
    code, stderr, seconds = run_gateway_to_exit(env_for(cluster.url))
    assert code == 1, stderr
    assert "REDIS_URL=redis+cluster://" in stderr
    assert seconds < 10


@pytest.mark.system
def test_start_fails_on_a_server_without_cluster_mode() -> None:
    with RedisServer(password="s3cret") as plain:
        url = f"redis+cluster://:s3cret@127.0.0.1:{plain.port}"
        code, stderr, _ = run_gateway_to_exit(env_for(url))
    assert code == 1, stderr
    assert "Cluster mode is not enabled" in stderr
    assert "s3cret" not in stderr
