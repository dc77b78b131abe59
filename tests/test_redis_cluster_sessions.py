"""Session safety on a real Redis Cluster (3 primaries) behind two gateway processes: id
rotation moves sessions between hash slots (SET NX on the new key, a one-key script on the
old: no cross-slot command), compare-and-set updates, and rate-limit buckets whose keys share
one slot per application.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from app.sessions.ids import session_key
from tests.conftest import GatewayProcessFactory
from tests.redis_topologies import GatewayHttp, RedisClusterTopology

pytestmark = pytest.mark.redis_server

PREFIX = "agent:sess:"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterTopology]:
    with RedisClusterTopology(3) as topology:
        yield topology


def all_keys(cluster: RedisClusterTopology) -> set[str]:
    return set().union(*cluster.keys_per_node().values())


async def test_rotation_updates_and_limits_on_a_cluster(
    cluster: RedisClusterTopology, gateway_process: GatewayProcessFactory, tmp_path: Path
) -> None:
    apps = tmp_path / "apps.toml"
    apps.write_text('[apps.demo]\nupstream = "builtin:demo"\nrate_limit_per_session = "3/minute"\n')
    env = {
        "SESSION_STORE": "redis",
        "REDIS_URL": cluster.url,
        "REDIS_PREFIX": PREFIX,
        "APPS_FILE": str(apps),
        "SESSION_ABSOLUTE_SECONDS": "43200",
    }
    one, two = gateway_process(env), gateway_process(env)
    async with GatewayHttp(one.url) as a, GatewayHttp(two.url) as b:
        # Rotation: 12 sessions, each rotated through the other process.
        moves: list[tuple[str, str]] = []
        for n in range(12):
            created = await a.patch({"n": n})
            assert created.status == 200 and created.sid is not None
            rotated = await b.request("POST", "/apps/demo/session/rotate", sid=created.sid)
            assert rotated.status == 200, rotated
            assert rotated.body == {"data": {"n": n}, "rotated": True}
            assert rotated.sid is not None and rotated.sid != created.sid
            moves.append((created.sid, rotated.sid))
        keys = all_keys(cluster)
        for n, (old, new) in enumerate(moves):
            assert session_key(PREFIX, "demo", old) in keys  # its rotation tombstone
            assert session_key(PREFIX, "demo", new) in keys
            dead = await a.get(old)  # the old id reads nothing: 409, the cookie untouched
            assert (dead.status, dead.body["error"]["code"]) == (409, "session_rotated"), dead
            assert dead.sid is None
            late = await a.patch({"late": 1}, sid=old)  # a late write: no fork, no cookie
            assert (late.status, late.body["error"]["code"], late.sid) == (
                409,
                "session_rotated",
                None,
            )
            assert (await a.get(new)).body == {"data": {"n": n}}

        def slot(sid: str) -> int:
            return key_slot(session_key(PREFIX, "demo", sid).encode())

        crossed = [old for old, new in moves if slot(old) != slot(new)]
        assert crossed, "no rotation crossed a hash slot"

        # Compare-and-set: concurrent PATCHes through both processes all survive.
        sid = moves[0][1]
        for round_ in range(10):
            replies = await asyncio.gather(
                a.patch({f"a{round_}": 1}, sid=sid), b.patch({f"b{round_}": 1}, sid=sid)
            )
            assert [r.status for r in replies] == [200, 200], replies
        data = (await b.get(sid)).body["data"]
        assert all(data.get(f"{p}{i}") == 1 for p in "ab" for i in range(10)), data

        # The status read (GET + PTTL pipelined to the key's node).
        status = await a.request("GET", "/apps/demo/session?slide=0", sid=sid)
        assert status.status == 200, status
        assert status.body["data"] == data
        assert 0 < status.body["idle_expires_in"] <= 3600
        assert 0 < status.body["absolute_expires_in"] <= 43200

        # Rate limits: one session's bucket is shared by both processes.
        statuses = []
        for http in (a, b, a, b):
            reply = await http.request(
                "POST", "/apps/demo/agent/chat", sid=sid, payload={"message": "hi"}
            )
            statuses.append(reply.status)
        assert statuses == [200, 200, 200, 429]
        buckets = {k for k in all_keys(cluster) if k.startswith("agent:aux:rl:")}
        assert buckets and {key_slot(k.encode()) for k in buckets} == {
            key_slot(b"agent:aux:rl:{demo}:app")
        }
