"""Runs in Redis, so that a reader on any replica can replay and follow a run pumped elsewhere.
(Over ~400 lines, on purpose: one class, one method per command or script a run sends; the
scripts, the entry format and the catch-up gate live in scripts.py, entries.py, catchup.py.)

Keys (all with the run id as hash tag, so one run's keys share a Redis Cluster slot):
- `{REDIS_AUX_PREFIX}run:{<id>}:m`  hash: `o` owner (a hash of the conversation id), `a`
  application id, `stop` (`1`: a stop was asked for).
- `{...}:e`  stream (created empty with the run): one entry per write of the pump, holding
  the consecutive events it had ready (one, or several when they came in one burst or while
  the previous write was in flight): entry id `0-<last seq>`, field `f` = its first seq,
  field `d` = the framed events (each ends with the only blank line in it, so they split
  again on `\n\n`). A last entry with field `x` = the end reason marks the end. Written only
  by the pumping replica (one write in flight at a time, so always in order), trimmed with
  `MINID` to its in-process log's bounds.
- `{...}:z`  the largest-entry bucket: no entry of the stream is larger (set with the first
  entry above it, in one script: `GROWN_XADD`), so a catch-up read takes as many entries as fit
  in `CATCHUP_BYTES` in one `XRANGE`.
- `{...}:h`  the pumper's heartbeat, `PX` = 4 heartbeats, refreshed every heartbeat (left to
  expire at the end). Missing while the run has no end entry: its pumper died.
- `{...}:r`  readers on other replicas, `PX` = the application's window, refreshed every
  heartbeat by each replica following the run (once for all its readers,
  app/runs/readers.py): the pumper's view of "somebody is still reading".
`m`, `e` and `z` expire one window (plus a heartbeat TTL) after the last heartbeat or the end.

Each application's budget of run data (`resume_redis_budget_bytes`, F3): counters
`{REDIS_AUX_PREFIX}runs:{<applicationId>}:bytes:<slot>`, one per slot of one window
(`slot = now // window`, this replica's clock), each `INCRBY` the memory a run costs Redis
(`app.runs.costs.run_cost`) after its end is recorded (`BUDGET_ADD`, with the TTL: two
windows after its slot began; a replica adds its ended runs together,
`app.runs.budget.BudgetLedger`). What the current and the previous slot hold is at least what
the application's ended runs keep in Redis (an ended run is kept one window after its end); a
new run starts only while that plus what this replica's own runs of the application hold but
have not counted yet (`app.runs.costs.UncountedCosts`) is under the budget (`budget_used`,
read at most every `RUN_BUDGET_REFRESH_SECONDS` per replica and application; over it,
`app.runs.start.start_run` relays without resume). A retried `INCRBY` may count twice: the
error is on the safe side. Near its budget, each replica also publishes what its runs of the
application hold uncounted in `{REDIS_AUX_PREFIX}runs:{<applicationId>}:flight` (a hash: a
field per replica, with its expiry), so that other replicas' checks see runs still pumping
(`budget_reserve`, `budget_publish`; attack-gate-9: 3 replicas x 4 clients reached 1.84-2.18x).

Reads of event data are bounded in what Redis must buffer (F4): Redis builds each reply in the
connection's output buffer, which counts in `used_memory` against `maxmemory`, so 64 readers
replaying ~4 MiB entries at once took a 96 MiB Redis to 271 MiB (attack-budget-3). Catch-up
reads (`range_after`: `XRANGE`, a few entries at a time, `next_catchup_count`) pass a gate of
`catchup_reads` (`RUN_CATCHUP_READS`) in flight per process; a follower catches up through
them before it blocks (app/runs/readers.py). `meta` never reads event data (one `HGETALL`).

Every command goes through `RedisBackend._run` (3 retries, one deadline, `StoreUnavailable`);
simple ones through the auto-pipeliner. Blocking `XREAD`s use their own bounded client
(`follow`, one connection per followed run: app/runs/readers.py), so a reader never holds a
connection the sessions need. Replies are normalised:
the pipeliner returns raw RESP2, a cluster client parses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError

from app.runs.catchup import CatchupGate, turn_of
from app.runs.entries import (
    CATCHUP_BYTES,
    PLAIN_READ_ENTRIES,
    Entry,
    SharedEntries,
    entries_of,
    entry_bucket,
    groups_of,
    kept_of,
    pairs_of,
    text_of,
)
from app.runs.scripts import (
    BUDGET_ADD,
    BUDGET_READ,
    BUDGET_RESERVE,
    CATCHUP_RANGE,
    CREATE_ENDED,
    CREATE_RUN,
    END_RUN,
    GROWN_XADD,
    MARK_FINISHED,
    PUBLISH_FLIGHT,
    REQUEST_STOP,
)
from app.sessions.redis import RedisBackend

# XADD with an id not above the stream's last one: what a retry after a lost reply meets.
_ALREADY_ADDED = "equal or smaller than the target stream top item"


@dataclass(frozen=True, slots=True)
class RunMeta:
    owner: str
    app_id: str
    end: str | None = None
    # The sequence number of the last event stored (0: none yet).
    last_seq: int = 0
    # A run cut over its budget (`end` run_over_budget) that has ended since where it ran.
    finished: bool = False


class RedisRunStore:
    """The Redis side of runs (see the module docstring). `follow` may be `backend` itself
    (tests); in production it is a second backend on a small dedicated pool."""

    def __init__(
        self,
        backend: RedisBackend,
        follow: RedisBackend,
        prefix: str,
        *,
        catchup_reads: int = 4,
        catchup_wait: float = 10.0,
        max_entry: int = 4 * 1024 * 1024,
    ) -> None:
        self._backend = backend
        self._follow = follow
        self._prefix = prefix
        self._catchup = CatchupGate(catchup_reads)
        self._catchup_wait = catchup_wait
        # The largest entry a run may have (one event: the largest `resume_max_bytes`), for
        # a catch-up read of a run without its largest-entry key.
        self._max_entry = max_entry
        # The large entries this process's readers hold, shared by the readers of a run.
        self._shared = SharedEntries()
        # This process among the replicas publishing runs in flight (`budget_publish`).
        self.replica = secrets.token_hex(8)

    def key(self, run_id: str, kind: str) -> str:
        return f"{self._prefix}run:{{{run_id}}}:{kind}"

    async def _all(self, *commands: Sequence[Any]) -> list[Any]:
        """Send `commands` together (one pipelined round trip), retried as one operation."""
        execute = self._backend.execute

        async def send() -> list[Any]:
            return list(await asyncio.gather(*(execute(*command) for command in commands)))

        return await self._backend._run(send)

    def _budget_keys(self, app_id: str, window_ms: int) -> list[str]:
        """[current slot's counter, previous slot's counter, runs in flight] of `app_id`."""
        slot = int(time.time() * 1000) // max(1, window_ms)
        base = f"{self._prefix}runs:{{{app_id}}}:"
        return [f"{base}bytes:{slot}", f"{base}bytes:{slot - 1}", f"{base}flight"]

    async def budget_used(self, app_id: str, *, window_ms: int) -> int:
        """The bytes `app_id`'s runs hold in Redis as far as Redis knows: those ended within
        the last one to two windows, plus the other replicas' runs in flight (their last
        `budget_publish`; a replica that stopped publishing counts as ended: BUDGET_READ)."""
        keys = self._budget_keys(app_id, window_ms)
        execute, args = self._backend.execute, [self.replica, 2 * max(1, window_ms)]
        return int(await self._backend._run(lambda: BUDGET_READ.run(execute, keys, args)))

    async def budget_reserve(
        self,
        app_id: str,
        *,
        window_ms: int,
        uncounted: int,
        budget: int,
        publish: int,
        ttl_ms: int,
    ) -> tuple[bool, int]:
        """Admit a run of `app_id` when what Redis knows (`budget_used`) plus this replica's
        `uncounted` is under `budget`, and then publish `publish` bytes as this replica's runs
        in flight for `ttl_ms`, in one step (BUDGET_RESERVE). Returns (admitted, what Redis
        knows)."""
        keys = self._budget_keys(app_id, window_ms)
        execute = self._backend.execute
        hash_ttl = ttl_ms + max(1, window_ms)
        args = [self.replica, 2 * max(1, window_ms), uncounted, budget, publish, ttl_ms, hash_ttl]
        used, admitted = await self._backend._run(lambda: BUDGET_RESERVE.run(execute, keys, args))
        return bool(admitted), int(used)

    async def budget_publish(
        self, app_id: str, flight: int, *, window_ms: int, ttl_ms: int
    ) -> None:
        """Publish `flight` bytes (0: none) as what this replica's runs of `app_id` hold in
        Redis uncounted, for `ttl_ms` (publish again before that, or it counts as ended)."""
        keys = self._budget_keys(app_id, window_ms)
        execute = self._backend.execute
        args = [self.replica, flight, ttl_ms, ttl_ms + max(1, window_ms)]
        await self._backend._run(lambda: PUBLISH_FLIGHT.run(execute, keys, args))

    async def budget_add(self, app_id: str, cost: int, *, window_ms: int) -> None:
        """Count ended runs of `app_id` that cost Redis `cost` bytes for a window
        (`app.runs.costs.run_cost`), with the counter's TTL in the same script: a counter
        never exists without one."""
        keys = self._budget_keys(app_id, window_ms)
        execute = self._backend.execute
        args = [self.replica, cost, 2 * max(1, window_ms)]
        await self._backend._run(lambda: BUDGET_ADD.run(execute, keys, args))

    async def create(
        self, run_id: str, meta: RunMeta, *, ttl_ms: int, heartbeat_ms: int, window_ms: int
    ) -> None:
        # No `r` yet: the request that starts the run reads it on this replica, which the
        # pump knows without Redis.
        # One script call (`CREATE_RUN`): one command to send and parse, not six.
        del window_ms
        keys = [self.key(run_id, "m"), self.key(run_id, "h"), self.key(run_id, "e")]
        args = [meta.owner, meta.app_id, ttl_ms, heartbeat_ms]
        execute = self._backend.execute
        await self._backend._run(lambda: CREATE_RUN.run(execute, keys, args))

    async def create_ended(
        self,
        run_id: str,
        meta: RunMeta,
        framed: bytes,
        count: int,
        *,
        reason: str,
        ttl_ms: int,
    ) -> None:
        """Create a run already ended: its `count` events from 1, `framed` (joined, at most
        `ENTRY_BYTES`: one entry), and its end `reason` in one entry, the keys' TTLs set to the
        window (`ttl_ms`); one script call (`CREATE_ENDED`)."""
        if count:
            args: list[Any] = [ttl_ms, f"0-{count}", 1, framed, reason, count]
            args.append(entry_bucket(len(framed)))
        else:
            args = [ttl_ms, "0-1", "", "", reason, 0, ""]
        args += [meta.owner, meta.app_id]
        keys = [self.key(run_id, "m"), self.key(run_id, "e"), self.key(run_id, "z")]
        execute = self._backend.execute
        await self._backend._run(lambda: CREATE_ENDED.run(execute, keys, args))

    async def append(
        self,
        run_id: str,
        entries: Sequence[tuple[int, bytes]],
        first_kept: int,
        *,
        expire_ms: int | None = None,
        exists: bool = False,
        largest: int = 0,
    ) -> int:
        """The consecutive `(seq, framed)` events from `first_kept` on (those before it are
        no longer in the run's log: not written) in one `XADD` per `ENTRY_BYTES` group
        (`_groups`), trimming entries that end below `first_kept` (exactly). `expire_ms`: the
        stream's TTL, set in the same round trip as each `XADD` that may create the stream.
        `exists` (the caller created it, with its TTL): each `XADD` is `NOMKSTREAM` alone, and
        only when the stream is gone (a Redis restart, an eviction) is it written again with
        its TTL, so a stream never exists without one. `largest`: the run's largest-entry
        bucket so far (`entry_bucket`); an entry above it goes with the new bucket in one
        script (`GROWN_XADD`, with `expire_ms`). Returns the run's bucket after these."""
        key = self.key(run_id, "e")
        execute = self._backend.execute
        for group in groups_of(kept_of(entries, first_kept)):
            args: tuple[Any, ...] = ()
            if first_kept > 1:
                args += ("MINID", "=", f"0-{first_kept}")
            data = group[0][1] if len(group) == 1 else b"".join(map(itemgetter(1), group))
            args += (f"0-{group[-1][0]}", "f", group[0][0], "d", data)
            bucket = entry_bucket(len(data))
            if bucket > largest and expire_ms is not None:
                grown = functools.partial(
                    GROWN_XADD.run,
                    execute,
                    [key, self.key(run_id, "z")],
                    [expire_ms, bucket, *args],
                )
                await self._backend._run(grown)
                largest = bucket
                continue
            if exists:
                nomkstream = ("XADD", key, "NOMKSTREAM", *args)
                if await self._backend._run(_idempotent_xadd(execute, nomkstream)):
                    continue
            expire = None if expire_ms is None else ("PEXPIRE", key, expire_ms)
            await self._backend._run(_idempotent_xadd(execute, ("XADD", key, *args), expire))
        return largest

    async def tick(
        self, run_id: str, *, heartbeat_ms: int, ttl_ms: int, keys: bool = True
    ) -> tuple[bool, int]:
        """The pumper's heartbeat: refresh it and (with `keys`) the TTLs; (stop asked for,
        reader key's milliseconds left: negative when no reader refreshed it within the
        window). A run cut over its budget ticks without `keys`: its meta lives on, what it
        wrote expires with its count."""
        m = self.key(run_id, "m")
        commands: list[tuple[Any, ...]] = [
            ("SET", self.key(run_id, "h"), "1", "PX", heartbeat_ms),
            ("HGET", m, "stop"),
            ("PTTL", self.key(run_id, "r")),
        ]
        # A cut run keeps its meta (its owner, for a stop or resume elsewhere: attack-13),
        # not its events.
        commands += [
            ("PEXPIRE", self.key(run_id, kind), ttl_ms) for kind in "mez"[: 3 if keys else 1]
        ]
        _, stop, pttl, *_ = await self._all(*commands)
        return stop is not None, int(pttl)

    async def end(
        self,
        run_id: str,
        entries: Sequence[tuple[int, bytes]],
        first_kept: int,
        *,
        end_seq: int,
        reason: str,
        ttl_ms: int,
        largest: int = 0,
    ) -> None:
        """The run's last events (if any) and its end in one entry, and the keys' TTLs set to
        the window: one script call (`END_RUN`), so the TTLs and the entry go together (the
        TTLs even when Redis refuses the entry). Events beyond the last `ENTRY_BYTES` group go
        before it (`append`). `largest`: the run's largest-entry bucket so far."""
        groups = groups_of(kept_of(entries, first_kept))
        if len(groups) > 1:
            earlier = [e for group in groups[:-1] for e in group]
            # With the TTL: these XADDs may create the stream, and one refused at `maxmemory`
            # stops the end before END_RUN sets it (attack-budget-3).
            largest = await self.append(
                run_id, earlier, first_kept, expire_ms=ttl_ms, largest=largest
            )
        entries = groups[-1] if groups else []
        args: list[Any] = [ttl_ms, f"0-{first_kept}" if first_kept > 1 else ""]
        grown = ""
        if entries:
            data = b"".join(map(itemgetter(1), entries))
            args += [f"0-{entries[-1][0]}", entries[0][0], data, reason, entries[-1][0]]
            bucket = entry_bucket(len(data))
            grown = str(bucket) if bucket > largest else ""
        else:
            args += [f"0-{end_seq}", "", "", reason, end_seq - 1]
        args.append(grown)
        keys = [self.key(run_id, "m"), self.key(run_id, "e"), self.key(run_id, "z")]
        execute = self._backend.execute
        await self._backend._run(lambda: END_RUN.run(execute, keys, args))

    async def meta(self, run_id: str) -> RunMeta | None:
        """The run's owner and application, and once it ended its end reason and last event's
        sequence number (kept in its meta hash by `END_RUN`). One `HGETALL`: never the
        stream, whose last entry may be MiBs (a resume flood of a live run copied its 4.1 MB
        last entry into a script per resume, ~4.5 ms of Redis each: every application
        slowed ~30x; attack-10)."""
        key = self.key(run_id, "m")
        execute = self._backend.execute
        fields = pairs_of(await self._backend._run(lambda: execute("HGETALL", key)))
        if "o" not in fields or "a" not in fields:
            return None
        owner, app_id = text_of(fields["o"]), text_of(fields["a"])
        if "l" in fields and "x" in fields:  # ended (END_RUN)
            end, last = text_of(fields["x"]), int(text_of(fields["l"]))
            return RunMeta(owner, app_id, end, last, finished="f" in fields)
        return RunMeta(owner, app_id)

    async def range_after(
        self, run_id: str, after: int, count: int, *, app_id: str, client: str
    ) -> list[Entry]:
        """Up to `count` entries after `after`, about `CATCHUP_BYTES` of them at most, through
        the catch-up gate (app/runs/catchup.py: at most `catchup_reads` in flight in this
        process, shared fairly by the applications and their clients, waiting at most
        `catchup_wait` seconds), on the blocking reads' client (the sessions' pipelined
        connection never queues behind a replay's megabytes). One script, `CATCHUP_RANGE`,
        reads the run's largest-entry bucket (`z`, no entry is larger) and, with it, one
        `XRANGE` of as many entries as fit in `CATCHUP_BYTES` (at least one) when
        `PLAIN_READ_ENTRIES` of the largest fit; else (no bucket, or a run with big entries:
        one of them would make every read of its small ones one entry long) a few entries
        per `XRANGE`, stopping past `CATCHUP_BYTES`. A reader whose next entry another
        reader here holds gets it without a read (`SharedEntries`)."""
        held = self._shared.starting_at(run_id, after + 1)
        if held is not None:  # another reader here holds the next entry: no read, no copy
            return [held]
        follow = self._follow
        execute = follow.client.execute_command
        async with self._catchup.slot(app_id, turn_of(client), wait=self._catchup_wait):
            keys = [self.key(run_id, "e"), self.key(run_id, "z")]
            args = [f"(0-{after}", count, CATCHUP_BYTES, self._max_entry, PLAIN_READ_ENTRIES]
            client_ = follow.client
            if isinstance(client_, aioredis.Redis):
                read = functools.partial(_watched_catchup, client_, keys, args)
            else:  # a cluster client has no WATCH: the script (atomic, Lua's copies)
                read = functools.partial(CATCHUP_RANGE.run, execute, keys, args)
            raw = await follow._run(read, budget=self._backend.op_timeout)
            return self._shared.share(run_id, entries_of(raw))

    async def follow(self, run_id: str, after: int, *, block_ms: int, count: int) -> list[Entry]:
        """`XREAD BLOCK`: the entries after `after`, waiting up to `block_ms` for one."""
        follow = self._follow
        key = self.key(run_id, "e")
        raw: Any = await follow._run(
            lambda: follow.client.execute_command(
                "XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", key, f"0-{after}"
            )
        )
        if not raw:
            return []
        if isinstance(raw, dict):  # RESP3-style parse
            return entries_of(next(iter(raw.values()), [[]])[0])
        return entries_of(raw[0][1])

    async def reader_tick(self, run_id: str, *, window_ms: int) -> bool:
        """A reader on another replica is here; True while the pumper's heartbeat lives."""
        _, alive = await self._all(
            ("SET", self.key(run_id, "r"), "1", "PX", window_ms),
            ("EXISTS", self.key(run_id, "h")),
        )
        return bool(int(alive))

    async def mark_finished(self, run_id: str) -> None:
        """A cut run ended where it ran: its meta says so (a stop elsewhere answered
        `stopping` for ever: attack-13), if the meta still exists (never made again without
        its TTL: `REQUEST_STOP`'s rule)."""
        keys = [self.key(run_id, "m")]
        execute = self._backend.execute
        await self._backend._run(lambda: MARK_FINISHED.run(execute, keys, []))

    async def request_stop(self, run_id: str) -> bool:
        """Ask the run's pumper to stop (the `stop` field of its meta, read every heartbeat),
        if its meta exists; whether its heartbeat key is alive (a replica pumps it)."""
        keys = [self.key(run_id, "m"), self.key(run_id, "h")]
        execute = self._backend.execute
        answer: int = await self._backend._run(lambda: REQUEST_STOP.run(execute, keys, []))
        return answer == 1


async def _watched_catchup(client: aioredis.Redis, keys: list[str], args: list[Any]) -> Any:
    """`CATCHUP_RANGE`'s read without a script when it is one `XRANGE` (a run of small
    entries): `WATCH` the run's largest-entry bucket, `GET` it, and when `PLAIN_READ_ENTRIES`
    of the largest fit, `XRANGE` as many as fit in `MULTI`; a write that grew the bucket
    meanwhile aborts it (nothing read: a burst between a bucket read and an `XRANGE` sized by
    it came back as 16 entries, 4.0 MB, attack-10) and the script reads instead. In a script
    the same `XRANGE` costs Redis ~7x (each entry copied into Lua and back: attack-gate-8's
    bound is 4x)."""
    events, bucket_key = keys
    start, count, limit, _, plain = args
    async with client.pipeline(transaction=True) as pipe:
        try:
            await pipe.watch(bucket_key)
            bucket = await pipe.get(bucket_key)
        except WatchError as err:
            # redis-py's word for a connection error while watching: retried as one
            # (attack-11: Redis stalls there cut replays with `run_store_unavailable`).
            raise RedisConnectionError(f"while watching the bucket: {err}") from err
        fit = 0 if bucket is None else limit // max(1, int(text_of(bucket)))
        if fit >= plain:
            pipe.multi()  # type: ignore[no-untyped-call]  # (redis-py leaves it untyped)
            pipe.execute_command("XRANGE", events, start, "+", "COUNT", min(count, fit))
            with contextlib.suppress(WatchError):
                (raw,) = await pipe.execute()
                return raw
    return await CATCHUP_RANGE.run(client.execute_command, keys, args)


def _idempotent_xadd(
    execute: Callable[..., Awaitable[Any]],
    command: tuple[Any, ...],
    expire: tuple[Any, ...] | None = None,
) -> Callable[[], Awaitable[bool]]:
    """One attempt of `command` (an `XADD`), and `expire` in the same round trip if given;
    whether the entry is in the stream (False: a `NOMKSTREAM` found no stream)."""

    async def send() -> bool:
        added = execute(*command)
        expired = None if expire is None else execute(*expire)
        try:
            return await added is not None
        except ResponseError as err:
            # A retry after a lost reply: the entry is there already.
            if _ALREADY_ADDED not in str(err):
                raise
            return True
        finally:
            if expired is not None:
                await expired

    return send
