"""The session store's operations counted and timed: `InstrumentedBackend` wraps the backend
(`app.metrics.instrument_backend`) and feeds `app.metrics.Metrics`' store series."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from app.sessions.backend import CasResult, SessionBackend, StoreUnavailable, TokenBucket

if TYPE_CHECKING:
    from app.fast_metrics import CounterChild, HistogramChild
    from app.metrics import Metrics

_T = TypeVar("_T")


class InstrumentedBackend:
    """A `SessionBackend` that counts and times each operation of the one it wraps."""

    def __init__(self, backend: SessionBackend, metrics: Metrics) -> None:
        self.backend = backend
        self._metrics = metrics
        # (operation, ok) -> the operation counter's and the duration histogram's series
        # (created on first use: a series appears once it has something to count).
        self._cells: dict[tuple[str, bool], tuple[CounterChild, HistogramChild]] = {}

    def _done(self, operation: str, started: float, ok: bool) -> None:
        cells = self._cells.get((operation, ok))
        if cells is None:
            m = self._metrics
            cells = self._cells[operation, ok] = (
                m.store_operations.child((operation, "ok" if ok else "error")),
                m.store_duration.child((operation,)),
            )
        cells[0].inc()
        cells[1].observe(time.perf_counter() - started)

    def _failed(self, operation: str, err: StoreUnavailable) -> None:
        cause = err.__cause__
        error = type(cause).__name__ if cause is not None else "StoreUnavailable"
        self._metrics.store_errors.labels(operation, error).inc()

    async def _timed(self, operation: str, pending: Awaitable[_T]) -> _T:
        """Await `pending`, the wrapped backend's `operation`: counted ok, or error when it
        raises (a `StoreUnavailable` counted by its cause too), and timed either way."""
        started = time.perf_counter()
        ok = False
        try:
            result = await pending
            ok = True
            return result
        except StoreUnavailable as err:
            self._failed(operation, err)
            raise
        finally:
            self._done(operation, started, ok)

    # The two operations of every request (a read; every write) hand back `_timed`'s coroutine
    # rather than awaiting it in one of their own: one coroutine less a call (about 0.1 us).
    def get_and_touch(self, key: str, ttl: int) -> Coroutine[Any, Any, bytes | None]:
        return self._timed("get_and_touch", self.backend.get_and_touch(key, ttl))

    async def create(self, key: str, value: bytes, ttl: int) -> bool:
        return await self._timed("create", self.backend.create(key, value, ttl))

    async def peek(self, key: str) -> tuple[bytes, float | None] | None:
        return await self._timed("peek", self.backend.peek(key))

    async def expire(self, key: str, ttl: int) -> None:
        await self._timed("expire", self.backend.expire(key, ttl))

    def compare_and_set(
        self, key: str, expected: str, value: bytes, ttl: int
    ) -> Coroutine[Any, Any, CasResult]:
        pending = self.backend.compare_and_set(key, expected, value, ttl)
        return self._timed("compare_and_set", pending)

    async def delete_if_revision(self, key: str, expected: str) -> CasResult:
        return await self._timed(
            "delete_if_revision", self.backend.delete_if_revision(key, expected)
        )

    async def delete_unless_revision(self, key: str, kept: str) -> CasResult:
        return await self._timed(
            "delete_unless_revision", self.backend.delete_unless_revision(key, kept)
        )

    async def replace(self, key: str, value: bytes, ttl: int) -> bytes | None:
        return await self._timed("replace", self.backend.replace(key, value, ttl))

    async def delete(self, key: str) -> None:
        await self._timed("delete", self.backend.delete(key))

    async def ping(self) -> None:
        await self._timed("ping", self.backend.ping())

    async def rate_limit(self, buckets: Sequence[TokenBucket]) -> float:
        return await self._timed("rate_limit", self.backend.rate_limit(buckets))

    async def close(self) -> None:
        await self.backend.close()
