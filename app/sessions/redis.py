"""Redis session backend: one `redis.asyncio` pool per process, every parameter explicit.

redis-py's defaults changed across 5.x-8.x (retries, timeouts, pool size, protocol), so none is
relied on. Budget: `Retry` with exponential backoff and 3 retries (the spec: at most 3 retries
per request; sleeps <= 0.1, 0.2, 0.4 s), short socket and connect timeouts, and an overall
deadline per operation (`op_timeout`) around the nested retry loops, so a dead or frozen Redis
answers `StoreUnavailable` in about two seconds instead of hanging the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.sessions.backend import StoreUnavailable

T = TypeVar("T")

# Failures that mean "the store is not answering right now": retried by redis-py where safe,
# and answered 503 by the gateway. ReadOnlyError / OutOfMemoryError are ResponseErrors.
_UNAVAILABLE = (RedisError, OSError, TimeoutError)
MIN_REDIS_VERSION = (6, 2)  # GETEX


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisOptions:
    url: str
    op_timeout: float = 2.0
    socket_timeout: float = 0.5
    connect_timeout: float = 0.5
    max_connections: int = 50
    pool_timeout: float = 1.0
    health_check_interval: int = 10
    retries: int = 3
    client_name: str = "agent-bff"


def make_client(options: RedisOptions) -> aioredis.Redis:
    """A client owning a bounded blocking pool; `await client.aclose()` closes both."""
    retry_errors = (RedisConnectionError, RedisTimeoutError)
    pool = aioredis.BlockingConnectionPool.from_url(
        options.url,
        max_connections=options.max_connections,
        timeout=options.pool_timeout,
        socket_timeout=options.socket_timeout,
        socket_connect_timeout=options.connect_timeout,
        socket_keepalive=True,
        health_check_interval=options.health_check_interval,
        retry=Retry(
            ExponentialWithJitterBackoff(base=0.05, cap=0.5),
            options.retries,
            supported_errors=retry_errors,
        ),
        retry_on_error=list(retry_errors),
        client_name=options.client_name,
        decode_responses=False,
        protocol=2,
    )
    return aioredis.Redis.from_pool(pool)


class RedisBackend:
    """Session operations, each one Redis command under the per-operation deadline."""

    def __init__(self, client: aioredis.Redis, *, op_timeout: float = 2.0) -> None:
        self.client = client
        self._op_timeout = op_timeout

    async def _run(self, awaitable: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._op_timeout):
                return await awaitable
        except _UNAVAILABLE as err:
            raise StoreUnavailable(f"{type(err).__name__}: {err}") from err

    async def get_and_touch(self, key: str, ttl: int) -> bytes | None:
        value: Any = await self._run(self.client.getex(key, ex=ttl))
        return bytes(value) if value is not None else None

    async def create(self, key: str, value: bytes, ttl: int) -> bool:
        return bool(await self._run(self.client.set(key, value, ex=ttl, nx=True)))

    async def update(self, key: str, value: bytes, ttl: int) -> bool:
        return bool(await self._run(self.client.set(key, value, ex=ttl, xx=True)))

    async def delete(self, key: str) -> None:
        await self._run(self.client.delete(key))

    async def ping(self) -> None:
        await self._run(self.client.ping())

    async def check_server(self, deadline: float) -> str:
        """Fail-fast start check: PING, then require Redis >= 6.2. Returns the version."""
        try:
            async with asyncio.timeout(deadline):
                await self.client.ping()
                info: dict[str, Any] = await self.client.info("server")
        except _UNAVAILABLE as err:
            raise StoreUnavailable(f"{type(err).__name__}: {err}") from err
        version = str(info.get("redis_version", "0"))
        numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if numbers < MIN_REDIS_VERSION:
            raise StoreUnavailable(f"Redis {version} is too old: 6.2 or newer is needed (GETEX)")
        return version

    async def close(self) -> None:
        await self.client.aclose()
