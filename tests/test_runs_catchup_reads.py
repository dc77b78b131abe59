"""Catch-up reads on redis-server (app/runs/store.py `range_after`): about `CATCHUP_BYTES` per
read whatever the count asked, through the run's largest-entry bucket (`z`, set with the first
entry above it: `GROWN_XADD`) and one plain `XRANGE`, or, without the bucket, the
`CATCHUP_RANGE` script; every entry once, in order."""

from __future__ import annotations

import pytest

from app.runs.entries import CATCHUP_BYTES, entry_bucket
from app.runs.store import RedisRunStore
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import RedisOptions, make_client
from tests.redis_server import RedisServer, command_calls

TTL_MS = 60_000


def _event(seq: int, size: int) -> tuple[int, bytes]:
    return seq, b"data: " + b"x" * size + f"\nid: {seq}\n\n".encode()


@pytest.mark.parametrize(
    ("with_bucket", "big", "plain"),
    [(True, 0, True), (True, 12, False), (False, 12, False)],
    ids=["tiny entries: one XRANGE", "tiny then big: the script", "no bucket: the script"],
)
async def test_reads_after_tiny_entries_stay_near_catchup_bytes(
    shared_redis: RedisServer, with_bucket: bool, big: int, plain: bool
) -> None:
    backend = RedisBackend(make_client(RedisOptions(url=shared_redis.url)))
    store = RedisRunStore(backend, backend, "t:")
    run_id = "C" * 22
    expire = TTL_MS if with_bucket else None  # no TTL given: no bucket written
    largest = 0
    try:
        seq = 0
        for _ in range(300):
            seq += 1
            largest = await store.append(
                run_id, [_event(seq, 20)], 1, expire_ms=expire, largest=largest
            )
        for _ in range(big):
            seq += 1
            largest = await store.append(
                run_id, [_event(seq, 200_000)], 1, expire_ms=expire, largest=largest
            )
        client = shared_redis.client()
        stored = client.get(f"t:run:{{{run_id}}}:z")
        if with_bucket:
            assert largest == entry_bucket(200_000 + 20 if big else 36)
            assert largest == (256 * 1024 if big else 1024)
            assert stored is not None and int(stored) == largest
            assert 0 < client.pttl(f"t:run:{{{run_id}}}:z") <= TTL_MS
        else:
            assert stored is None
        client.config_resetstat()
        pos, biggest, seen = 0, 0, []
        while True:
            entries = await store.range_after(run_id, pos, 512, app_id="shop", client="c")
            if not entries:
                break
            biggest = max(biggest, sum(len(e.data or b"") for e in entries))
            seen += [e.seq for e in entries]
            pos = entries[-1].seq
        calls = command_calls(client)
    finally:
        await backend.close()
    assert seen == list(range(1, seq + 1))
    assert biggest <= CATCHUP_BYTES + 200_100
    if plain:  # 256 tiny entries fit a plain XRANGE: 256, 44, then the empty end
        assert calls.get("xrange", 0) == 3 and "evalsha" not in calls, calls
    else:
        assert calls.get("evalsha", 0) >= 1, calls
