"""Redis session backend: one client per process for any topology, every parameter explicit.
(Just over ~400 lines, on purpose: one method per store operation of the contract in
app/sessions/backend.py, and the one retry loop they all go through; the client, the URL and
the retry rules live in redis_client.py, redis_url.py and redis_retry.py.)

`REDIS_URL` picks the topology (`parse_redis_url`):
- `redis://` / `rediss://` (TLS): one server, a bounded blocking pool.
- `redis+sentinel://[user:password@]host1:26379,host2:26379/<master-name>/<db>`: the primary
  is looked up through Sentinel on every new connection, so a failover is followed without a
  restart. `READONLY` from a demoted primary disconnects that connection and is retried
  (redis-py's `SentinelManagedConnection` turns it into a `ConnectionError`), so the next
  attempt asks Sentinel again.
- `redis+cluster://[user:password@]host1:7000,host2:7001`: `RedisCluster` follows
  `MOVED`/`ASK` and refreshes its slot map; a primary that is down fails only the keys of its
  slots.

redis-py's defaults changed across 5.x-8.x (retries, timeouts, pool size, protocol), so none is
relied on. Budget, the same for every topology (the spec: "at most 3 retries per request"):

- redis-py retries nothing. Its retry object is consulted by several nested loops (8.1: the
  connect loop in `get_connection`/`connect()`, `call_with_retry` around each command or
  pipeline, the reconnect inside `send_packed_command`, the health-check PING, the Sentinel
  connect loop), so a `Retry(…, 3)` multiplied into up to 16 connection attempts per
  operation. Every data connection, and every Sentinel connection, gets `Retry(NoBackoff(), 0)`;
  `RedisCluster` gets it too (its node connections are built with 0 retries by redis-py
  itself), so its own loop makes exactly one attempt.
- `RedisBackend._run` is the only retry loop: one operation is at most 1 + 3 attempts, each
  making at most one new connection, with equal-jitter exponential backoff between them
  (0.125-0.25, 0.25-0.5, 0.5-1 s: a Redis restart or LOADING of up to ~0.9 s is always waited
  out), all inside one deadline per operation (`op_timeout`), so a dead or frozen Redis answers
  `StoreUnavailable` within it, naming the real error and the number of attempts. On a
  cluster, the slot map is refreshed before a retry (as redis-py's own loop would).
- Short socket and connect timeouts bound each attempt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import ReadOnlyError, RedisClusterException, RedisError, ResponseError

from app.sessions.backend import CasResult, StoreFull, StoreUnavailable, TokenBucket
from app.sessions.pipelining import CommandPipeliner
from app.sessions.redis_client import RedisClient
from app.sessions.redis_retry import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    RETRIES,
    UNAVAILABLE,
    Attempts,
    backoff_delay,
    deadline_message,
    describe,
    failure_message,
    is_wrong_type,
    retryable,
)
from app.sessions.redis_scripts import (
    COMPARE_AND_SET,
    DELETE_IF_REVISION,
    DELETE_UNLESS_REVISION,
    RATE_LIMIT,
    Execute,
    cas_result,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MIN_REDIS_VERSION = (6, 2)  # GETEX
CLUSTER_SLOTS = 16384


class RedisBackend:
    """Session operations, each one Redis round trip on one key, with the retry budget and the
    per-operation deadline. Works on a single server, a Sentinel-managed primary, or a Redis
    Cluster (scripts touch one key, so they never cross a hash slot).

    Single server and Sentinel: commands go through a `CommandPipeliner` (`pipelining=True`,
    the default), so the commands of concurrent requests share pipelined round trips; each
    operation keeps its own deadline and retry budget. Cluster: one command per call
    (`RedisCluster` routes each key to its node).

    Retries (`_run`): at most `retries` (3) after the first attempt, only for `retryable`
    errors, sleeping `backoff_delay` between attempts, all within `op_timeout`; a retry that
    could not finish in time is not started. Every command we send is safe to repeat when a
    reply was lost: `GETEX … EX`, `SET … NX|XX EX`, `DEL`, `EXPIRE`, `GET`/`PTTL`. The
    compare-and-set scripts are checked, not blind: a retry after a lost reply whose write did
    land sees its own new revision and answers "conflict" (the gateway re-reads and re-applies
    the change, which is then a no-op merge) or, for `delete_if_revision`, "missing" (a
    rotation then reports the session as ended; the new id is removed). A lost `SET NX` reply
    leaves an orphan key that its TTL removes. The rate-limit script may count a request
    twice in that case (the limit errs on the strict side).
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        op_timeout: float = 2.0,
        retries: int = RETRIES,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        pipelining: bool = True,
    ) -> None:
        self.client = client
        self.pipeliner: CommandPipeliner | None = None
        self.execute: Execute = client.execute_command
        if pipelining and isinstance(client, aioredis.Redis):
            self.pipeliner = CommandPipeliner(client.connection_pool)
            self.execute = self.pipeliner.execute
        self._op_timeout = op_timeout
        self._retries = retries
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap

    @property
    def op_timeout(self) -> float:
        """Seconds one operation (all its attempts) may take."""
        return self._op_timeout

    async def _run(
        self, operation: Callable[[], Awaitable[T]], *, budget: float | None = None
    ) -> T:
        """Run `operation()` (a fresh awaitable per attempt) with the retry budget, within
        `budget` (default `op_timeout`) seconds overall. Raises `StoreFull` (OOM: never
        retried), or `StoreUnavailable` naming the real error and the number of attempts."""
        budget = self._op_timeout if budget is None else budget
        attempts = Attempts()
        scope = asyncio.timeout(budget)
        try:
            async with scope:
                return await self._attempts(operation, attempts, scope)
        except ReadOnlyError as err:
            # A demoted primary (failover behind a DNS name or proxy): drop the idle
            # connections so the next request connects afresh and finds the new primary.
            await self._drop_idle_connections()
            raise StoreUnavailable(f"ReadOnlyError: {err}") from err
        except RedisOutOfMemoryError as err:
            # maxmemory reached with `noeviction`: writes are refused (never retried), reads
            # and deletes still work.
            raise StoreFull(f"OutOfMemoryError: {err}") from err
        except UNAVAILABLE as err:
            if isinstance(err, TimeoutError) and scope.expired():
                raise StoreUnavailable(deadline_message(budget, attempts)) from err
            raise StoreUnavailable(failure_message(err, attempts, budget)) from err

    async def _attempts(
        self, operation: Callable[[], Awaitable[T]], attempts: Attempts, scope: asyncio.Timeout
    ) -> T:
        loop = asyncio.get_running_loop()
        while True:
            attempts.count += 1
            try:
                if attempts.last is not None:
                    await self._before_retry(attempts.last)
                return await operation()
            except UNAVAILABLE as err:
                if not retryable(err):
                    raise
                attempts.last = err
                if attempts.count > self._retries:
                    raise
                delay = backoff_delay(
                    attempts.count, base=self._backoff_base, cap=self._backoff_cap
                )
                deadline = scope.when()
                if deadline is not None and loop.time() + delay >= deadline:
                    attempts.out_of_time = True
                    raise
            await asyncio.sleep(delay)

    async def _before_retry(self, failure: BaseException) -> None:
        """Cluster: refresh the slot map before the next attempt, asking the node that just
        failed last (what redis-py's own cluster retry loop does, minus its missing sleep)."""
        if isinstance(self.client, RedisCluster):
            node = getattr(failure, "last_failed_node_name", None)
            if isinstance(node, str):
                await self.client.initialize(last_failed_node_name=node)

    async def _drop_idle_connections(self) -> None:
        pool = getattr(self.client, "connection_pool", None)
        if isinstance(pool, aioredis.ConnectionPool):
            try:
                await pool.disconnect(inuse_connections=False)
            except UNAVAILABLE:  # best effort: a broken socket is dropped either way
                log.debug("disconnecting idle Redis connections failed", exc_info=True)

    async def get_and_touch(self, key: str, ttl: int) -> bytes | None:
        try:
            value: Any = await self._run(lambda: self.execute("GETEX", key, "EX", ttl))
        except StoreUnavailable as err:
            if not is_wrong_type(err.__cause__):
                raise
            # A non-string key under our prefix is not a session: like a corrupt value it
            # counts as none and is removed (otherwise every request would answer 503).
            log.warning("session key of the wrong Redis type removed")
            await self.delete(key)
            return None
        return bytes(value) if value is not None else None

    async def create(self, key: str, value: bytes, ttl: int) -> bool:
        """`SET key value EX ttl NX`: False when `key` exists. A retry (the attempt before
        may have run and lost its reply: a slow Redis) that finds `key` holding `value` is
        that attempt's write, not a collision (taken for one, three such made a new user's
        request a 500: attack-10)."""
        attempt = 0

        async def send() -> bool:
            nonlocal attempt
            attempt += 1
            if await self.execute("SET", key, value, "EX", ttl, "NX"):
                return True
            if attempt == 1:
                return False
            held = await self.execute("GET", key)
            return held is not None and bytes(held) == value

        return await self._run(send)

    async def replace(self, key: str, value: bytes, ttl: int) -> bytes | None:
        """`SET key value XX GET EX ttl` (Redis >= 6.2). A retry after a lost reply returns
        the value this call stored (rotation recognises its own tombstone)."""
        command = ("SET", key, value, "XX", "GET", "EX", ttl)

        def send() -> Awaitable[Any]:
            if self.pipeliner is not None:
                return self.execute(*command)  # raw replies
            # redis-py's SET reply callback turns the value into a bool unless told `get`.
            return self.client.execute_command(*command, get=True)

        previous: Any = await self._run(send)
        return bytes(previous) if previous is not None else None

    async def delete(self, key: str) -> None:
        await self._run(lambda: self.execute("DEL", key))

    async def peek(self, key: str) -> tuple[bytes, float | None] | None:
        """`GET` + `PTTL`, sent together (one pipelined round trip on a single server or
        Sentinel); nothing slides."""

        async def both() -> tuple[Any, ...]:
            result: tuple[Any, ...] = await asyncio.gather(
                self.execute("GET", key), self.execute("PTTL", key), return_exceptions=True
            )
            for item in result:  # a lost reply comes back as a value: retry the pair
                if isinstance(item, BaseException) and retryable(item):
                    raise item
            return result

        value, pttl = await self._run(both)
        if is_wrong_type(value):
            log.warning("session key of the wrong Redis type removed")
            await self.delete(key)
            return None
        if isinstance(value, BaseException):
            raise StoreUnavailable(describe(value)) from value
        if value is None:
            return None
        left = int(pttl) / 1000 if isinstance(pttl, int) and pttl >= 0 else None
        return bytes(value), left

    async def expire(self, key: str, ttl: int) -> None:
        await self._run(lambda: self.execute("EXPIRE", key, ttl))

    async def compare_and_set(self, key: str, expected: str, value: bytes, ttl: int) -> CasResult:
        reply = await self._run(
            lambda: COMPARE_AND_SET.run(self.execute, [key], [expected, value, ttl])
        )
        return cas_result(reply)

    async def delete_if_revision(self, key: str, expected: str) -> CasResult:
        reply = await self._run(lambda: DELETE_IF_REVISION.run(self.execute, [key], [expected]))
        return cas_result(reply)

    async def delete_unless_revision(self, key: str, kept: str) -> CasResult:
        try:
            reply = await self._run(lambda: DELETE_UNLESS_REVISION.run(self.execute, [key], [kept]))
        except StoreUnavailable as err:
            if not is_wrong_type(err.__cause__):
                raise
            await self.delete(key)  # not a session (nor a tombstone): removed, as `DEL` would
            return "ok"
        return cas_result(reply)

    async def ping(self) -> None:
        """Readiness. Single / Sentinel: PING the (current) primary. Cluster: ready when at
        least one primary answers, because the gateway still serves every slot whose primary
        is up; taking all replicas out of the load balancer would turn a partial outage into
        a total one. Keys of a dead primary's slots answer 503 on their own."""
        client = self.client
        if isinstance(client, RedisCluster):
            await self._run(lambda: self._cluster_ping_any(client))
        else:
            await self._run(client.ping)

    async def rate_limit(self, buckets: Sequence[TokenBucket]) -> float:
        """One `EVALSHA` (`RATE_LIMIT`) over every bucket's key: they must share a hash slot on
        a cluster (a `{hash tag}` in the keys)."""
        keys = [b.key for b in buckets]
        args: list[Any] = []
        for bucket in buckets:
            args += [f"{bucket.interval_ms:.3f}", f"{bucket.period_ms:.3f}"]
        reply = await self._run(lambda: RATE_LIMIT.run(self.execute, keys, args))
        return int(reply) / 1000

    @staticmethod
    async def _cluster_ping_any(client: RedisCluster) -> None:
        await client.initialize()
        pings = [
            asyncio.ensure_future(client.execute_command("PING", target_nodes=node))
            for node in client.get_primaries()
        ]
        errors: list[BaseException] = []
        try:
            for done in asyncio.as_completed(pings):
                try:
                    await done
                    return
                except UNAVAILABLE as err:
                    errors.append(err)
        finally:
            for task in pings:
                task.cancel()
            await asyncio.gather(*pings, return_exceptions=True)
        raise errors[0] if errors else RedisClusterException("no primary in the slot map")

    async def check_server(self, deadline: float) -> str:
        """Fail-fast start check: PING, then require Redis >= 6.2. Returns the version.

        Cluster: the slot map must cover all 16384 slots and every primary must answer and be
        new enough, so a broken cluster is caught at deploy time (at runtime, a dead primary
        only fails its own slots). Sentinel: the primary Sentinel names must answer.
        The same retry budget as any operation, within `deadline` seconds.
        """
        client = self.client

        async def infos_of_every_server() -> list[dict[str, Any]]:
            if isinstance(client, RedisCluster):
                return await self._cluster_infos(client)
            await client.ping()
            return [await client.info("server")]

        try:
            infos = await self._run(infos_of_every_server, budget=deadline)
        except StoreUnavailable as err:
            detail = None
            if isinstance(err.__cause__, MasterNotFoundError):
                detail = await self._sentinel_refusal()
            if detail is None:
                raise
            raise StoreUnavailable(f"{err} ({detail})") from err.__cause__
        versions = [str(info.get("redis_version", "0")) for info in infos]
        for version in versions:
            numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
            if numbers < MIN_REDIS_VERSION:
                raise StoreUnavailable(
                    f"Redis {version} is too old: 6.2 or newer is needed (GETEX)"
                )
        return min(versions)

    async def _sentinel_refusal(self) -> str | None:
        """Why the Sentinels found no primary, when one of them refuses Sentinel commands (a
        plain Redis server named as a Sentinel): redis-py 8.2 reports only "No master found",
        8.1 also the server's "unknown command 'SENTINEL'"."""
        manager = getattr(getattr(self.client, "connection_pool", None), "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", None) or []:
            try:
                await asyncio.wait_for(sentinel.execute_command("SENTINEL", "MASTERS"), 1.0)
            except ResponseError as err:
                return f"ResponseError: {err}"
            except (OSError, TimeoutError, RedisError):
                continue
        return None

    @staticmethod
    async def _cluster_infos(client: RedisCluster) -> list[dict[str, Any]]:
        await client.initialize()
        covered = len(client.nodes_manager.slots_cache)
        if covered < CLUSTER_SLOTS:
            raise RedisClusterException(
                f"the cluster covers {covered} of {CLUSTER_SLOTS} hash slots: assign every "
                "slot (redis-cli --cluster fix) before starting"
            )
        primaries = client.get_primaries()
        await asyncio.gather(
            *(client.execute_command("PING", target_nodes=node) for node in primaries)
        )
        results = await asyncio.gather(
            *(client.execute_command("INFO", "server", target_nodes=node) for node in primaries)
        )
        return [dict(r) for r in results]

    async def close(self) -> None:
        if self.pipeliner is not None:
            await self.pipeliner.close()
        pool = getattr(self.client, "connection_pool", None)
        await self.client.aclose()
        sentinel = getattr(pool, "sentinel_manager", None)
        if isinstance(sentinel, Sentinel):
            await sentinel.aclose()
