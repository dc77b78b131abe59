"""The retry policy of `RedisBackend._run` (`app.sessions.redis`): which Redis failures
another attempt may cure (`retryable`), the backoff between attempts (`backoff_delay`), and
the `StoreUnavailable` message naming the real error and the number of attempts."""

from __future__ import annotations

import random
import ssl
from dataclasses import dataclass

from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    MaxConnectionsError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Failures that mean "the store is not answering right now": retried by redis-py where safe,
# and answered 503 by the gateway. ReadOnlyError / OutOfMemoryError are ResponseErrors;
# RedisClusterException (no reachable node, slot not covered) is not even a RedisError.
UNAVAILABLE = (RedisError, RedisClusterException, OSError, TimeoutError)
# Of those, the ones another attempt may cure (`retryable`): the connection failed or timed
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


def retryable(err: BaseException) -> bool:
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
class Attempts:
    """What one operation's retry loop did, for the message when it fails."""

    count: int = 0
    last: BaseException | None = None  # the last retryable failure
    out_of_time: bool = False  # stopped early: the next sleep would pass the deadline


def is_wrong_type(err: BaseException | None) -> bool:
    return isinstance(err, ResponseError) and str(err).startswith("WRONGTYPE")


def _plural(count: int) -> str:
    return f"{count} attempt" if count == 1 else f"{count} attempts"


def failure_message(err: BaseException, attempts: Attempts, budget: float) -> str:
    """The real error, and how many attempts it took: `ConnectionError: … after 4 attempts`."""
    if not retryable(err):
        text = describe(err)
        return text if attempts.count == 1 else f"{text} (attempt {attempts.count})"
    text = f"{describe(err)} after {_plural(attempts.count)}"
    if attempts.out_of_time:
        text += f" (no time left for another within the {budget:g} s deadline)"
    return text


def deadline_message(budget: float, attempts: Attempts) -> str:
    """The deadline cut an attempt short: say so, and what the attempt before it met."""
    text = f"TimeoutError: no answer within the {budget:g} s deadline ({_plural(attempts.count)}"
    if attempts.last is not None:
        text += f"; the one before failed with {describe(attempts.last)}"
    return text + ")"


def describe(err: BaseException) -> str:
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
