"""The one place in app/ that reads another library's private attributes: the connection
counts of a redis-py cluster node, for the `redis_pool_connections{state}` gauge.

A standalone or Sentinel client's pool answers through public API
(`ConnectionPool.get_connection_count()`, app/metrics.py); a `redis.asyncio.cluster.ClusterNode`
has no such method in redis-py 8.1, only its lists `_connections` (every connection it made) and
`_free` (the idle ones). Read only at scrape time, never on a request's path.

Fence: `self_check()` runs once at start-up (when metrics are set up) and checks, on a node that
never connects, that acquiring a connection (public `acquire_connection`) adds to
`_connections` and releasing it (public `release`) adds to `_free`; when that fails, or with
`FAST_PATHS=off`, `node_connections` is not used and a cluster exports only the pool bound
(`redis_pool_max_connections`), not the per-state gauge.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sized

from redis.asyncio.cluster import ClusterNode

_log = logging.getLogger(__name__)


def node_connections(node: object) -> tuple[int, int] | None:
    """(in use, idle) connections of a redis-py cluster node; None if it does not have the
    attributes (not a `ClusterNode`, or a redis-py that renamed them)."""
    made = getattr(node, "_connections", None)
    free = getattr(node, "_free", None)
    if not isinstance(made, Sized) or not isinstance(free, Sized):
        return None
    idle = len(free)
    return max(len(made) - idle, 0), idle


def self_check() -> str | None:
    """None when `node_connections` reads what redis-py's public calls did; else the problem."""
    try:
        node = ClusterNode("127.0.0.1", 6379, max_connections=2)
        before = node_connections(node)
        connection = node.acquire_connection()  # makes a connection object; no socket yet
        acquired = node_connections(node)
        node.release(connection)
        released = node_connections(node)
    except Exception as err:  # a changed redis-py API
        return f"{type(err).__name__}: {err}"
    if (before, acquired, released) != ((0, 0), (1, 0), (0, 1)):
        return (
            f"cluster node counts {before}, {acquired}, {released}; expected (0, 0), (1, 0), (0, 1)"
        )
    return None


@functools.cache
def usable() -> bool:
    """`self_check()` passed (checked once per process; the reason is logged when it fails)."""
    problem = self_check()
    if problem is not None:
        _log.warning("metrics: no per-state Redis cluster connection gauge: %s", problem)
    return problem is None
