"""In-process session backend with the same contract as Redis, bounded.

Entries expire `ttl` seconds after their last touch, like Redis keys with `EX`. The store holds
at most `max_entries` and at most `max_bytes` (each entry counted as its key, its stored value
and `ENTRY_OVERHEAD_BYTES`); a background sweep drops expired entries. Sessions here are per
process: they do not survive a restart or span replicas. Rate-limit buckets (`rate_limit`) are
kept apart from the sessions, at most `max_entries` of them too.

Eviction is a segmented LRU, so a flood of one-shot sessions (cookieless agent calls, scanners)
cannot push out the sessions people use: a new entry starts in the *probation* segment; when it
is used again (read, or updated) it moves to the *protected* segment, which holds at most
`PROTECTED_SHARE` of the store (beyond that its least recently used entries drop back to
probation). When the store is full, the least recently used probation entries go first, and
protected ones only when probation is empty. A session that was created and never used again is
still the first to go.

Memory: each entry is one key in a plain insertion-ordered dict (no `OrderedDict` nodes), the
key stored as ASCII bytes (16 bytes less than a `str` object), and as value the session bytes
prefixed with their expiry as a 4-byte count of 1/16 s since the store started (no tuple, no
float object; an entry may expire up to 1/16 s early, never late): about 50 bytes per entry over
the key and value themselves. Plain dicts get slow at removing
their oldest entries one by one (each lookup of the oldest skips the slots freed before it), so
the store evicts and demotes in batches of `max_entries // 100` (at least 1) and scans once per
batch; over `max_bytes` it evicts down to 99% of it, for the same reason.

Bytes: `ENTRY_OVERHEAD_BYTES` is what an entry costs beyond its key and value bytes, measured
with tracemalloc on 10^3-10^5 entries (110-145 bytes: two bytes objects' headers, the dict slot
and index at the dicts' fill) plus malloc's own rounding and headers, which tracemalloc does not
see. The process's RSS also holds what requests allocate while they run and the allocator's
free lists: measured in tests/test_session_floods.py (20,000 cookieless 64 KB PATCHes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from app.sessions.backend import CasResult, TokenBucket, revision_of

PROTECTED_SHARE = 0.8
ENTRY_OVERHEAD_BYTES = 160
_TICKS = 16  # expiry resolution: 1/16 s
_EXPIRY = struct.Struct("<i")  # ticks since the store's epoch: +-4 years
_MAX_TICKS = 2**31 - 1
_pack_ticks = _EXPIRY.pack
_unpack_ticks = _EXPIRY.unpack_from
_EXPIRY_BYTES = _EXPIRY.size


def _b(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


def gcra(
    tats: Sequence[float], buckets: Sequence[TokenBucket], now: float
) -> tuple[float, list[float]]:
    """(milliseconds to wait, new arrival times) for one request against every bucket, given
    their theoretical arrival times `tats` (ms; 0 for a full bucket) at `now` (ms)."""
    wait = 0.0
    new_tats: list[float] = []
    for tat, bucket in zip(tats, buckets, strict=True):
        new_tat = max(tat, now) + bucket.interval_ms
        allow_at = new_tat - bucket.period_ms
        wait = max(wait, allow_at - now)
        new_tats.append(new_tat)
    return wait, new_tats


class MemoryBackend:
    """A segmented LRU of `key -> expiry + value` with Redis-like TTL semantics."""

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`max_bytes`: the bound on the entries' bytes (None: only `max_entries` bounds)."""
        # Oldest first in both dicts (insertion order; a use re-inserts at the end).
        self._probation: dict[bytes, bytes] = {}
        self._protected: dict[bytes, bytes] = {}
        self._max_entries = max_entries
        self._protected_max = int(max_entries * PROTECTED_SHARE)
        self._batch = max(1, max_entries // 100)
        self._max_bytes = max_bytes
        # Bytes of every entry (`_cost`), kept exact on every insert, replace and removal.
        self.bytes = 0
        self._clock = clock
        self._epoch = clock() - 1.0
        self._sweeper: asyncio.Task[None] | None = None
        self.evictions = 0
        # Rate-limit buckets (`rate_limit`): key -> theoretical arrival time (ms), oldest
        # first, at most `max_entries`; apart from the sessions and their byte count.
        self._buckets: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def _pack(self, ttl: float, value: bytes, now: float | None = None) -> bytes:
        # Rounded down: an entry may expire up to one tick early, never late.
        ticks = int(((self._clock() if now is None else now) + ttl - self._epoch) * _TICKS)
        return _pack_ticks(max(-_MAX_TICKS, min(ticks, _MAX_TICKS))) + value

    @staticmethod
    def _cost(k: bytes, raw: bytes) -> int:
        return len(k) + len(raw) + ENTRY_OVERHEAD_BYTES

    def _expiry(self, raw: bytes) -> float:
        ticks: int = _unpack_ticks(raw)[0]
        return self._epoch + ticks / _TICKS

    def _raw(self, k: bytes) -> bytes | None:
        """The stored `expiry + value` of a live entry; an expired one is dropped."""
        raw = self._protected.get(k)
        if raw is None:
            raw = self._probation.get(k)
            if raw is None:
                return None
        if self._expiry(raw) <= self._clock():
            self._remove(k)
            return None
        return raw

    def _remove(self, k: bytes) -> None:
        raw = self._protected.pop(k, None)
        if raw is None:
            raw = self._probation.pop(k, None)
        if raw is not None:
            self.bytes -= self._cost(k, raw)

    def _store(self, k: bytes, value: bytes, ttl: float) -> None:
        """Store `value` for `ttl` seconds as a *new* entry (probation) unless `k` is already
        stored, in which case this is a use: it moves to the protected segment's end."""
        raw = self._pack(ttl, value)
        old = self._protected.pop(k, None)
        if old is None:
            old = self._probation.pop(k, None)
        if old is not None:
            self.bytes -= self._cost(k, old)
            self._protected[k] = raw
            if len(self._protected) > self._protected_max:
                self._demote()
        else:
            self._probation[k] = raw
        self.bytes += self._cost(k, raw)
        excess = len(self._probation) + len(self._protected) - self._max_entries
        if excess > 0:
            self._evict(max(excess, self._batch))
        if self._max_bytes is not None and self.bytes > self._max_bytes:
            self._shrink(self._max_bytes)

    def _demote(self) -> None:
        """Move the protected segment's least recently used entries (at least a batch) back
        to probation, down to its bound."""
        overflow = len(self._protected) - self._protected_max
        for old in self._oldest(self._protected, max(overflow, self._batch)):
            self._probation[old] = self._protected.pop(old)

    @staticmethod
    def _oldest(segment: dict[bytes, bytes], count: int) -> list[bytes]:
        return list(itertools.islice(segment, count))

    def _evict(self, count: int) -> None:
        for segment in (self._probation, self._protected):
            for k in self._oldest(segment, count):
                self.bytes -= self._cost(k, segment.pop(k))
                count -= 1
                self.evictions += 1
            if count <= 0:
                return

    def _shrink(self, max_bytes: int) -> None:
        """Evict least recently used entries, probation first, until the entries' bytes are
        at most 99% of `max_bytes` (a batch: one scan of each segment's oldest)."""
        excess = self.bytes - (max_bytes - max_bytes // 100)
        for segment in (self._probation, self._protected):
            victims: list[bytes] = []
            for k, raw in segment.items():
                if excess <= 0:
                    break
                victims.append(k)
                excess -= self._cost(k, raw)
            for k in victims:
                self.bytes -= self._cost(k, segment.pop(k))
                self.evictions += 1
            if excess <= 0:
                return

    async def get_and_touch(self, key: str, ttl: int) -> bytes | None:
        # `_raw` then `_store`, folded (every session read): the entry is taken out of its
        # segment once; a live one goes back at the protected end (a use), an expired one
        # stays out. The entry count is unchanged, so nothing is evicted.
        k = _b(key)
        now = self._clock()
        raw = self._protected.pop(k, None)
        if raw is None:
            raw = self._probation.pop(k, None)
            if raw is None:
                return None
        if self._epoch + _unpack_ticks(raw)[0] / _TICKS <= now:
            self.bytes -= self._cost(k, raw)
            return None
        value = raw[_EXPIRY_BYTES:]
        self._protected[k] = self._pack(ttl, value, now)
        if len(self._protected) > self._protected_max:
            self._demote()
        return value

    async def create(self, key: str, value: bytes, ttl: int) -> bool:
        k = _b(key)
        if self._raw(k) is not None:
            return False
        self._store(k, value, ttl)
        return True

    async def compare_and_set(self, key: str, expected: str, value: bytes, ttl: int) -> CasResult:
        # No await between the check and the write: atomic on the event loop, like the script.
        # `_raw` then `_store`, folded as in `get_and_touch` (every session write).
        k = _b(key)
        now = self._clock()
        segment = self._protected
        raw = segment.get(k)
        if raw is None:
            segment = self._probation
            raw = segment.get(k)
            if raw is None:
                return "missing"
        if self._epoch + _unpack_ticks(raw)[0] / _TICKS <= now:
            del segment[k]
            self.bytes -= self._cost(k, raw)
            return "missing"
        if revision_of(raw[_EXPIRY_BYTES:]) != expected:
            return "conflict"
        del segment[k]
        self._protected[k] = self._pack(ttl, value, now)
        self.bytes += len(value) + _EXPIRY_BYTES - len(raw)
        if len(self._protected) > self._protected_max:
            self._demote()
        if self._max_bytes is not None and self.bytes > self._max_bytes:
            self._shrink(self._max_bytes)
        return "ok"

    async def delete_if_revision(self, key: str, expected: str) -> CasResult:
        return self._delete_when(key, lambda revision: revision == expected)

    async def delete_unless_revision(self, key: str, kept: str) -> CasResult:
        return self._delete_when(key, lambda revision: revision != kept)

    def _delete_when(self, key: str, deletes: Callable[[str], bool]) -> CasResult:
        """Delete the value at `key` when `deletes(its revision)`: "ok"; "conflict" when not;
        "missing" without a value. No await: atomic on the event loop, like the Lua scripts."""
        k = _b(key)
        raw = self._raw(k)
        if raw is None:
            return "missing"
        if not deletes(revision_of(raw[_EXPIRY_BYTES:])):
            return "conflict"
        self._remove(k)
        return "ok"

    async def replace(self, key: str, value: bytes, ttl: int) -> bytes | None:
        # No await between the read and the write: atomic on the event loop, like SET ... GET.
        # Not a use: the replacement (a rotation tombstone) goes to the probation end, so a
        # flood of rotations cannot push the sessions people use out of the protected segment.
        k = _b(key)
        raw = self._raw(k)
        if raw is None:
            return None
        self._remove(k)
        packed = self._pack(ttl, value)
        self._probation[k] = packed
        self.bytes += self._cost(k, packed)
        if self._max_bytes is not None and self.bytes > self._max_bytes:
            self._shrink(self._max_bytes)
        return raw[_EXPIRY_BYTES:]

    async def peek(self, key: str) -> tuple[bytes, float | None] | None:
        """The value and its seconds left, without sliding (nor counting as use)."""
        raw = self._raw(_b(key))
        if raw is None:
            return None
        return raw[_EXPIRY_BYTES:], self._expiry(raw) - self._clock()

    async def expire(self, key: str, ttl: int) -> None:
        # A new deadline in place: not a use (the entry keeps its segment and position).
        k = _b(key)
        raw = self._raw(k)
        if raw is not None:
            segment = self._protected if k in self._protected else self._probation
            segment[k] = self._pack(ttl, raw[_EXPIRY_BYTES:])

    async def delete(self, key: str) -> None:
        self._remove(_b(key))

    async def ping(self) -> None:
        return None

    async def rate_limit(self, buckets: Sequence[TokenBucket]) -> float:
        """GCRA over every bucket at once, on this process's clock: a request refused by one
        bucket takes nothing from the others."""
        now = self._clock() * 1000
        tats = self._buckets
        wait, new_tats = gcra([tats.get(b.key, 0.0) for b in buckets], buckets, now)
        if wait > 0:
            return wait / 1000
        for bucket, tat in zip(buckets, new_tats, strict=True):
            tats[bucket.key] = tat
            tats.move_to_end(bucket.key)
        # A bucket whose arrival time has passed is full again: dropping it changes nothing.
        while tats and (len(tats) > self._max_entries or next(iter(tats.values())) <= now):
            tats.popitem(last=False)
        return 0.0

    def sweep(self) -> int:
        """Drop every expired entry; returns how many were dropped."""
        now = self._clock()
        dropped = 0
        # Compared in ticks: one decode per entry, not a float conversion.
        limit = int((now - self._epoch) * _TICKS)
        for segment in (self._probation, self._protected):
            expired = [k for k, raw in segment.items() if _unpack_ticks(raw)[0] <= limit]
            for k in expired:
                self.bytes -= self._cost(k, segment.pop(k))
            dropped += len(expired)
        return dropped

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
        self._probation.clear()
        self._protected.clear()
        self._buckets.clear()
        self.bytes = 0
