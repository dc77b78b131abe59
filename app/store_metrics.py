"""The session store's operations counted and timed: `InstrumentedBackend` wraps the backend
(`app.metrics.instrument_backend`) and feeds `app.metrics.Metrics`' store series."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from app.sessions.backend import CasResult, SessionBackend, StoreUnavailable, TokenBucket

if TYPE_CHECKING:
    from app.fast_metrics import CounterChild, HistogramChild
    from app.metrics import Metrics


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

    @contextlib.contextmanager
    def _observe(self, operation: str) -> Iterator[None]:
        started = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        except StoreUnavailable as err:
            self._failed(operation, err)
            raise
        finally:
            self._done(operation, started, ok)

    async def get_and_touch(self, key: str, ttl: int) -> bytes | None:
        # Every request's read: `_observe` inlined (no generator context manager per call).
        started = time.perf_counter()
        ok = False
        try:
            value = await self.backend.get_and_touch(key, ttl)
            ok = True
            return value
        except StoreUnavailable as err:
            self._failed("get_and_touch", err)
            raise
        finally:
            self._done("get_and_touch", started, ok)

    async def create(self, key: str, value: bytes, ttl: int) -> bool:
        with self._observe("create"):
            return await self.backend.create(key, value, ttl)

    async def peek(self, key: str) -> tuple[bytes, float | None] | None:
        with self._observe("peek"):
            return await self.backend.peek(key)

    async def expire(self, key: str, ttl: int) -> None:
        with self._observe("expire"):
            await self.backend.expire(key, ttl)

    async def compare_and_set(self, key: str, expected: str, value: bytes, ttl: int) -> CasResult:
        # Every write: inlined like `get_and_touch`.
        started = time.perf_counter()
        ok = False
        try:
            result = await self.backend.compare_and_set(key, expected, value, ttl)
            ok = True
            return result
        except StoreUnavailable as err:
            self._failed("compare_and_set", err)
            raise
        finally:
            self._done("compare_and_set", started, ok)

    async def delete_if_revision(self, key: str, expected: str) -> CasResult:
        with self._observe("delete_if_revision"):
            return await self.backend.delete_if_revision(key, expected)

    async def delete_unless_revision(self, key: str, kept: str) -> CasResult:
        with self._observe("delete_unless_revision"):
            return await self.backend.delete_unless_revision(key, kept)

    async def replace(self, key: str, value: bytes, ttl: int) -> bytes | None:
        with self._observe("replace"):
            return await self.backend.replace(key, value, ttl)

    async def delete(self, key: str) -> None:
        with self._observe("delete"):
            await self.backend.delete(key)

    async def ping(self) -> None:
        with self._observe("ping"):
            await self.backend.ping()

    async def rate_limit(self, buckets: Sequence[TokenBucket]) -> float:
        with self._observe("rate_limit"):
            return await self.backend.rate_limit(buckets)

    async def close(self) -> None:
        await self.backend.close()
