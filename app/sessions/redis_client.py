"""The Redis client for `REDIS_URL`'s topology (`make_client`, `RedisOptions`): single server
or TLS (a bounded blocking pool), Sentinel, or Cluster, every redis-py parameter explicit and
redis-py's own retries off (`RedisBackend._run` in `app.sessions.redis` is the only retry loop;
that module's docstring gives the topologies and the budget).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from app.sessions.redis_url import RedisTarget, parse_redis_url

log = logging.getLogger(__name__)

RedisClient = aioredis.Redis | RedisCluster


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
        # Called through a typed name: redis-py 8.1 leaves `Sentinel.__init__` unannotated, 8.2
        # annotates it (a `type: ignore` would be wrong on one of them).
        make_sentinel: Callable[..., Sentinel] = Sentinel
        sentinel = make_sentinel(
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
