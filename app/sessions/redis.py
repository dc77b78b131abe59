"""Redis session backend: one client per process for any topology, every parameter explicit.

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
import hashlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    MaxConnectionsError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.sessions.backend import CasResult, StoreFull, StoreUnavailable, TokenBucket
from app.sessions.pipelining import CommandPipeliner
from app.sessions.redis_url import RedisTarget, parse_redis_url

log = logging.getLogger(__name__)

T = TypeVar("T")

# Failures that mean "the store is not answering right now": retried by redis-py where safe,
# and answered 503 by the gateway. ReadOnlyError / OutOfMemoryError are ResponseErrors;
# RedisClusterException (no reachable node, slot not covered) is not even a RedisError.
_UNAVAILABLE = (RedisError, RedisClusterException, OSError, TimeoutError)
# Of those, the ones another attempt may cure (`_retryable`): the connection failed or timed
# out (this includes `BusyLoadingError`: a restarted server still loading its data; Sentinel's
# `MasterNotFoundError`; and a demoted primary's READONLY, which redis-py's Sentinel-managed
# connection turns into "The previous master is now a slave"), or the cluster is reconfiguring
# (`CLUSTERDOWN`). Never a ResponseError such as WRONGTYPE, OOM or READONLY on a plain URL.
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ClusterDownError)
# Connection errors that are final: a wrong password or ACL, or no free connection in our own
# pool (the blocking pool already waited `pool_timeout` for one; a cluster node pool is full).
_FINAL = (AuthenticationError, AuthorizationError, MaxConnectionsError)
_POOL_EXHAUSTED = "No connection available."  # BlockingConnectionPool.get_connection
_MAXCLIENTS = "max number of clients"  # the server refuses new connections (maxclients)
# The spec: "Maximum 3 retries per request". Equal jitter (half fixed, half random), not full
# jitter: with full jitter the three sleeps can all be ~0, so the budget that waits out a
# short Redis restart would be random.
RETRIES = 3
BACKOFF_BASE = 0.125  # the first sleep is 0.125-0.25 s, then 0.25-0.5 s, then 0.5-1 s
BACKOFF_CAP = 1.0
MIN_REDIS_VERSION = (6, 2)  # GETEX
CLUSTER_SLOTS = 16384

RedisClient = aioredis.Redis | RedisCluster
# Sends one command (`"GETEX", key, "EX", 60`) and returns its reply: the auto-pipeliner's
# `execute`, or a client's `execute_command`.
Execute = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisOptions:
    url: str
    op_timeout: float = 2.0
    socket_timeout: float = 0.5
    connect_timeout: float = 0.5
    max_connections: int = 50
    pool_timeout: float = 1.0
    health_check_interval: int = 10
    client_name: str = "agent-bff"
    # TLS (rediss://): verification is on unless `tls_verify` is False; `tls_ca_file` None
    # means the system's CA store.
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    # AUTH for the Sentinel processes themselves (the URL's password is the data nodes').
    sentinel_password: str | None = None


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel-discovered primary behind a *blocking* bounded pool: when every connection is
    busy a request waits up to `timeout` seconds (then 503) instead of failing at once."""


def _no_retry() -> Retry:
    """redis-py's retry object for every connection: one try at each of its nested loops.
    (The asyncio class: redis.retry.Retry is the sync one, redis-py #4262.) The retries live in
    `RedisBackend._run`, once per operation."""
    return Retry(NoBackoff(), 0)


def _common_kwargs(options: RedisOptions, target: RedisTarget) -> dict[str, Any]:
    """Connection parameters every topology's data connections share."""
    return {
        "socket_timeout": options.socket_timeout,
        "socket_connect_timeout": options.connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": options.health_check_interval,
        "client_name": options.client_name,
        "username": target.username,
        "password": target.password,
        "decode_responses": False,
        # RESP2: the same behaviour on redis-py 5.x-8.x, no HELLO / maintenance notifications.
        "protocol": 2,
    }


def _tls_kwargs(options: RedisOptions) -> dict[str, Any]:
    if not options.tls_verify:
        log.warning(
            "REDIS_TLS_VERIFY=false: the Redis server certificate is NOT verified; anyone on "
            "the path can impersonate Redis. Use REDIS_TLS_CA_FILE instead."
        )
    return {
        "ssl_ca_certs": options.tls_ca_file,
        "ssl_certfile": options.tls_cert_file,
        "ssl_keyfile": options.tls_key_file,
        "ssl_cert_reqs": "required" if options.tls_verify else "none",
        "ssl_check_hostname": options.tls_verify,
    }


def make_client(options: RedisOptions) -> RedisClient:
    """The client for `options.url`'s topology; `RedisBackend.close()` releases everything.

    Raises `RedisUrlError` for a malformed URL (settings validation catches that first).
    """
    target = parse_redis_url(options.url)
    common = _common_kwargs(options, target)
    if target.topology == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            # The cluster client reads only the count (its node connections always get 0
            # retries from redis-py): 0 = one attempt per call; `RedisBackend._run` retries,
            # refreshing the slot map first.
            retry=_no_retry(),
            # Per node; a node's pool does not block: exhausted -> MaxConnectionsError -> 503.
            max_connections=options.max_connections,
            # A hole in the slot map must fail only its keys, not every refresh of the map;
            # `check_server` insists on full coverage at start instead.
            require_full_coverage=False,
            **common,
        )
    if target.topology == "sentinel":
        assert target.service_name is not None
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            target.nodes,
            sentinel_kwargs={
                "socket_timeout": options.socket_timeout,
                "socket_connect_timeout": options.connect_timeout,
                "socket_keepalive": True,
                "password": options.sentinel_password,
                "client_name": options.client_name,
                "protocol": 2,
                # Several Sentinels already give redundancy: one that is dead (or reached
                # through a stale pooled connection after its restart) is skipped at once
                # for the next; the operation's retry asks them all again.
                "retry": _no_retry(),
                "max_connections": 8,
            },
        )
        client: aioredis.Redis = sentinel.master_for(
            target.service_name,
            connection_pool_class=_BlockingSentinelPool,
            max_connections=options.max_connections,
            timeout=options.pool_timeout,
            db=target.db,
            retry=_no_retry(),
            **common,
        )
        return client
    connection: dict[str, Any] = {"connection_class": Connection}
    if target.tls:
        connection = {"connection_class": SSLConnection, **_tls_kwargs(options)}
    host, port = target.nodes[0]
    pool = aioredis.BlockingConnectionPool(
        host=host,
        port=port,
        db=target.db,
        max_connections=options.max_connections,
        timeout=options.pool_timeout,
        retry=_no_retry(),
        **common,
        **connection,
    )
    return aioredis.Redis.from_pool(pool)


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script run with `EVALSHA`, falling back to `EVAL` (which also caches it on that
    server) when the server does not know it yet (`NOSCRIPT`: first use, restart, failover,
    another cluster node). One round trip in the steady state."""

    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> LuaScript:
        return cls(source, hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest())

    async def run(self, execute: Execute, keys: list[str], args: list[Any]) -> Any:
        try:
            return await execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await execute("EVAL", self.source, len(keys), *keys, *args)


# The revision of a stored value: keep in sync with `app.sessions.backend.REVISION_RE`.
_REVISION_PATTERN = '^{"v":%d+,"r":(%d+),'

# KEYS[1] session key; ARGV[1] expected revision, ARGV[2] new value, ARGV[3] TTL (seconds).
# Revisions are compared as strings (no float rounding of large numbers in Lua).
COMPARE_AND_SET = LuaScript.of(
    f"""local current = redis.call('GET', KEYS[1])
if not current then return 'missing' end
local revision = string.match(current, '{_REVISION_PATTERN}') or '0'
if revision ~= ARGV[1] then return 'conflict' end
redis.call('SET', KEYS[1], ARGV[2], 'XX', 'EX', ARGV[3])
return 'ok'"""
)

# KEYS[1] session key; ARGV[1] expected revision.
DELETE_IF_REVISION = LuaScript.of(
    f"""local current = redis.call('GET', KEYS[1])
if not current then return 'missing' end
local revision = string.match(current, '{_REVISION_PATTERN}') or '0'
if revision ~= ARGV[1] then return 'conflict' end
redis.call('DEL', KEYS[1])
return 'ok'"""
)

# KEYS[1] session key; ARGV[1] the revision that is kept (a rotation tombstone's).
DELETE_UNLESS_REVISION = LuaScript.of(
    f"""local current = redis.call('GET', KEYS[1])
if not current then return 'missing' end
local revision = string.match(current, '{_REVISION_PATTERN}') or '0'
if revision == ARGV[1] then return 'conflict' end
redis.call('DEL', KEYS[1])
return 'ok'"""
)

# KEYS: one per bucket (same hash slot). ARGV: interval_ms, period_ms per bucket (GCRA, as
# `app.sessions.memory.gcra`, on Redis's clock). Answers 0 (allowed, every bucket updated) or
# the milliseconds to wait (nothing updated).
RATE_LIMIT = LuaScript.of(
    """local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wait = 0
local tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - period
  if allow_at - now > wait then wait = allow_at - now end
  tats[i] = new_tat
end
if wait > 0 then return math.ceil(wait) end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.3f', tats[i]), 'PX', math.ceil(tats[i] - now))
end
return 0"""
)

_CAS_RESULTS: dict[bytes, CasResult] = {b"ok": "ok", b"conflict": "conflict", b"missing": "missing"}


def _cas_result(reply: Any) -> CasResult:
    value = reply.encode() if isinstance(reply, str) else bytes(reply)
    return _CAS_RESULTS[value]


def _retryable(err: BaseException) -> bool:
    """Whether another attempt of the same operation may succeed (see `_TRANSIENT`)."""
    if isinstance(err, _FINAL):
        return False
    if isinstance(err, RedisConnectionError) and str(err) == _POOL_EXHAUSTED:
        return False
    if isinstance(err, ResponseError) and str(err).startswith(_MAXCLIENTS):
        # A cluster node's "max number of clients + cluster connections reached" (Redis 7+),
        # which redis-py leaves a ResponseError (it maps only the exact plain-server text).
        return True
    if isinstance(err, RedisClusterException):
        # "Redis Cluster cannot be connected": no seed answered CLUSTER SLOTS (but not a
        # SlotNotCoveredError: the slot map has a hole that another try would find again).
        return isinstance(err.__cause__, (RedisConnectionError, RedisTimeoutError))
    return isinstance(err, _TRANSIENT)


def backoff_delay(failures: int, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Seconds to sleep after the `failures`-th failed attempt: equal jitter over
    `min(cap, base * 2**failures)` (half of it fixed, half random), so the sleeps grow
    0.125-0.25, 0.25-0.5, 0.5-1 s with the defaults."""
    ceiling = min(cap, base * 2.0**failures)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(slots=True)
class _Attempts:
    """What one operation's retry loop did, for the message when it fails."""

    count: int = 0
    last: BaseException | None = None  # the last retryable failure
    out_of_time: bool = False  # stopped early: the next sleep would pass the deadline


class RedisBackend:
    """Session operations, each one Redis round trip on one key, with the retry budget and the
    per-operation deadline. Works on a single server, a Sentinel-managed primary, or a Redis
    Cluster (scripts touch one key, so they never cross a hash slot).

    Single server and Sentinel: commands go through a `CommandPipeliner` (`pipelining=True`,
    the default), so the commands of concurrent requests share pipelined round trips; each
    operation keeps its own deadline and retry budget. Cluster: one command per call
    (`RedisCluster` routes each key to its node).

    Retries (`_run`): at most `retries` (3) after the first attempt, only for `_retryable`
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

    async def _run(
        self, operation: Callable[[], Awaitable[T]], *, budget: float | None = None
    ) -> T:
        """Run `operation()` (a fresh awaitable per attempt) with the retry budget, within
        `budget` (default `op_timeout`) seconds overall. Raises `StoreFull` (OOM: never
        retried), or `StoreUnavailable` naming the real error and the number of attempts."""
        budget = self._op_timeout if budget is None else budget
        attempts = _Attempts()
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
        except _UNAVAILABLE as err:
            if isinstance(err, TimeoutError) and scope.expired():
                raise StoreUnavailable(_deadline_message(budget, attempts)) from err
            raise StoreUnavailable(_failure_message(err, attempts, budget)) from err

    async def _attempts(
        self, operation: Callable[[], Awaitable[T]], attempts: _Attempts, scope: asyncio.Timeout
    ) -> T:
        loop = asyncio.get_running_loop()
        while True:
            attempts.count += 1
            try:
                if attempts.last is not None:
                    await self._before_retry(attempts.last)
                return await operation()
            except _UNAVAILABLE as err:
                if not _retryable(err):
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
            except _UNAVAILABLE:  # best effort: a broken socket is dropped either way
                log.debug("disconnecting idle Redis connections failed", exc_info=True)

    async def get_and_touch(self, key: str, ttl: int) -> bytes | None:
        try:
            value: Any = await self._run(lambda: self.execute("GETEX", key, "EX", ttl))
        except StoreUnavailable as err:
            if not _is_wrong_type(err.__cause__):
                raise
            # A non-string key under our prefix is not a session: like a corrupt value it
            # counts as none and is removed (otherwise every request would answer 503).
            log.warning("session key of the wrong Redis type removed")
            await self.delete(key)
            return None
        return bytes(value) if value is not None else None

    async def create(self, key: str, value: bytes, ttl: int) -> bool:
        return bool(await self._run(lambda: self.execute("SET", key, value, "EX", ttl, "NX")))

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
                if isinstance(item, BaseException) and _retryable(item):
                    raise item
            return result

        value, pttl = await self._run(both)
        if _is_wrong_type(value):
            log.warning("session key of the wrong Redis type removed")
            await self.delete(key)
            return None
        if isinstance(value, BaseException):
            raise StoreUnavailable(_describe(value)) from value
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
        return _cas_result(reply)

    async def delete_if_revision(self, key: str, expected: str) -> CasResult:
        reply = await self._run(lambda: DELETE_IF_REVISION.run(self.execute, [key], [expected]))
        return _cas_result(reply)

    async def delete_unless_revision(self, key: str, kept: str) -> CasResult:
        try:
            reply = await self._run(lambda: DELETE_UNLESS_REVISION.run(self.execute, [key], [kept]))
        except StoreUnavailable as err:
            if not _is_wrong_type(err.__cause__):
                raise
            await self.delete(key)  # not a session (nor a tombstone): removed, as `DEL` would
            return "ok"
        return _cas_result(reply)

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
                except _UNAVAILABLE as err:
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

        infos = await self._run(infos_of_every_server, budget=deadline)
        versions = [str(info.get("redis_version", "0")) for info in infos]
        for version in versions:
            numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
            if numbers < MIN_REDIS_VERSION:
                raise StoreUnavailable(
                    f"Redis {version} is too old: 6.2 or newer is needed (GETEX)"
                )
        return min(versions)

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


def _is_wrong_type(err: BaseException | None) -> bool:
    return isinstance(err, ResponseError) and str(err).startswith("WRONGTYPE")


def _plural(count: int) -> str:
    return f"{count} attempt" if count == 1 else f"{count} attempts"


def _failure_message(err: BaseException, attempts: _Attempts, budget: float) -> str:
    """The real error, and how many attempts it took: `ConnectionError: … after 4 attempts`."""
    if not _retryable(err):
        text = _describe(err)
        return text if attempts.count == 1 else f"{text} (attempt {attempts.count})"
    text = f"{_describe(err)} after {_plural(attempts.count)}"
    if attempts.out_of_time:
        text += f" (no time left for another within the {budget:g} s deadline)"
    return text


def _deadline_message(budget: float, attempts: _Attempts) -> str:
    """The deadline cut an attempt short: say so, and what the attempt before it met."""
    text = f"TimeoutError: no answer within the {budget:g} s deadline ({_plural(attempts.count)}"
    if attempts.last is not None:
        text += f"; the one before failed with {_describe(attempts.last)}"
    return text + ")"


def _describe(err: BaseException) -> str:
    """`Type: message`, short and with a hint for the usual causes (TLS, Sentinel, deadline)."""
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, MasterNotFoundError):
        # redis-py appends the repr of every Sentinel client (hundreds of characters).
        head = str(err).split(" : ", 1)[0]
        return (
            f"{type(err).__name__}: {head} (no Sentinel in REDIS_URL answered, or none knows a "
            "healthy primary by that name; check the hosts, the master name and "
            "REDIS_SENTINEL_PASSWORD)"
        )
    if isinstance(err, TimeoutError) and not str(err):
        return f"{type(err).__name__}: no answer within the deadline"
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(cause):
            return (
                f"{text} (TLS: check that REDIS_TLS_CA_FILE holds the CA that signed the "
                "server certificate and that the certificate names the host in REDIS_URL)"
            )
        cause = cause.__cause__ or cause.__context__
    return text
