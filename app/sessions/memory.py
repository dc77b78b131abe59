"""In-process session backend with the same contract as Redis, bounded.

Entries expire `ttl` seconds after their last touch, like Redis keys with `EX`. The store holds
at most `max_entries`: a new entry beyond that evicts the least recently used one, so a flood of
anonymous requests cannot grow memory without limit. A background sweep drops expired entries.
Sessions here are per process: they do not survive a restart or span replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable

from app.sessions.backend import CasResult, revision_of


class MemoryBackend:
    """An LRU dict of `key -> (value, expires_at)` with Redis-like TTL semantics."""

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._max_entries = max_entries
        self._clock = clock
        self._sweeper: asyncio.Task[None] | None = None
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _live(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._entries[key]
            return None
        return entry[0]

    def _put(self, key: str, value: bytes, ttl: int) -> None:
        self._entries[key] = (value, self._clock() + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1

    async def get_and_touch(self, key: str, ttl: int) -> bytes | None:
        value = self._live(key)
        if value is not None:
            self._put(key, value, ttl)
        return value

    async def create(self, key: str, value: bytes, ttl: int) -> bool:
        if self._live(key) is not None:
            return False
        self._put(key, value, ttl)
        return True

    async def update(self, key: str, value: bytes, ttl: int) -> bool:
        """Unconditional `SET XX EX` (not used by the gateway, which writes with
        `compare_and_set`)."""
        if self._live(key) is None:
            return False
        self._put(key, value, ttl)
        return True

    async def compare_and_set(self, key: str, expected: str, value: bytes, ttl: int) -> CasResult:
        # No await between the check and the write: atomic on the event loop, like the script.
        current = self._live(key)
        if current is None:
            return "missing"
        if revision_of(current) != expected:
            return "conflict"
        self._put(key, value, ttl)
        return "ok"

    async def delete_if_revision(self, key: str, expected: str) -> CasResult:
        current = self._live(key)
        if current is None:
            return "missing"
        if revision_of(current) != expected:
            return "conflict"
        del self._entries[key]
        return "ok"

    async def peek(self, key: str) -> tuple[bytes, float | None] | None:
        """The value and its seconds left, without sliding (nor counting as use)."""
        value = self._live(key)
        if value is None:
            return None
        return value, self._entries[key][1] - self._clock()

    async def expire(self, key: str, ttl: int) -> None:
        value = self._live(key)
        if value is not None:
            self._entries[key] = (value, self._clock() + ttl)

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    async def ttl(self, key: str) -> float | None:
        """Seconds left for `key` (None when absent); for tests and the status endpoint."""
        entry = self._entries.get(key)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[1] - self._clock()

    async def ping(self) -> None:
        return None

    def sweep(self) -> int:
        """Drop every expired entry; returns how many were dropped."""
        now = self._clock()
        expired = [k for k, (_, expires_at) in self._entries.items() if expires_at <= now]
        for key in expired:
            del self._entries[key]
        return len(expired)

    def start_sweeping(self, interval: float) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                self.sweep()

        self._sweeper = asyncio.get_running_loop().create_task(loop())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        self._entries.clear()
