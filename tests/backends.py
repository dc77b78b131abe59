"""A session backend wrapper for tests that make one operation misbehave (slow, racing,
failing) while every other operation reaches the real backend unchanged.

Import as `from tests.backends import WrappedBackend`; subclass it and override the
operations under test.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.sessions.backend import CasResult, SessionBackend, TokenBucket


class WrappedBackend:
    """A `SessionBackend` that forwards every operation to `inner` as it is."""

    def __init__(self, inner: SessionBackend) -> None:
        self.inner = inner

    async def get_and_touch(self, key: str, ttl: int) -> bytes | None:
        return await self.inner.get_and_touch(key, ttl)

    async def peek(self, key: str) -> tuple[bytes, float | None] | None:
        return await self.inner.peek(key)

    async def expire(self, key: str, ttl: int) -> None:
        await self.inner.expire(key, ttl)

    async def create(self, key: str, value: bytes, ttl: int) -> bool:
        return await self.inner.create(key, value, ttl)

    async def compare_and_set(self, key: str, expected: str, value: bytes, ttl: int) -> CasResult:
        return await self.inner.compare_and_set(key, expected, value, ttl)

    async def delete_if_revision(self, key: str, expected: str) -> CasResult:
        return await self.inner.delete_if_revision(key, expected)

    async def delete_unless_revision(self, key: str, kept: str) -> CasResult:
        return await self.inner.delete_unless_revision(key, kept)

    async def replace(self, key: str, value: bytes, ttl: int) -> bytes | None:
        return await self.inner.replace(key, value, ttl)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def ping(self) -> None:
        await self.inner.ping()

    async def rate_limit(self, buckets: Sequence[TokenBucket]) -> float:
        return await self.inner.rate_limit(buckets)

    async def close(self) -> None:
        await self.inner.close()
