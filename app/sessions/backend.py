"""The key-value contract every session backend implements (memory, Redis).

Each method is one store operation (one round trip) on one key:
- `get_and_touch(key, ttl)`: the value, with its TTL reset to `ttl` (Redis `GETEX key EX ttl`);
  `None` when missing or expired. Every ordinary session read is exactly this one command.
- `peek(key)`: `(value, seconds left)` without sliding anything (Redis: a pipeline of `GET` and
  `PTTL`); `None` when missing. Seconds left is `None` for a key without expiry.
- `expire(key, ttl)`: set the TTL of an existing key (Redis `EXPIRE`); used only to pull an idle
  TTL in under a session's absolute deadline.
- `create(key, value, ttl)`: store only if absent (`SET NX EX`); False if it existed.
- `compare_and_set(key, expected, value, ttl)`: replace the value only if the key exists and its
  stored revision is `expected` (Redis: one `EVALSHA` of a script that checks and does
  `SET XX EX` atomically). Answers `"ok"`, `"conflict"` (someone else wrote meanwhile) or
  `"missing"` (deleted or expired: a write racing a logout never brings the session back).
- `delete_if_revision(key, expected)`: delete only if the stored revision is `expected` (one
  `EVALSHA`); same answers. Session id rotation uses it so a write landing between the copy
  and the delete of the old key is not lost.
- `delete_unless_revision(key, kept)`: delete unless the stored revision is `kept` (one
  `EVALSHA`); "conflict" when it is (nothing deleted). A logout uses it with the rotation
  tombstone's revision, so a logout carrying a rotated-away id never removes the tombstone.
- `replace(key, value, ttl)`: store `value` only if the key exists, and return the value it
  replaced (Redis `SET key value XX GET EX ttl`); None when missing (nothing stored). Session
  id rotation leaves its tombstone at the old id with it: blind, so no concurrent write can
  make it fail, and the value returned is the last one any write left there.
- `delete(key)`: remove (idempotent).
- `ping()`: raises unless the store answers.
- `rate_limit(buckets)`: take one request from every `TokenBucket`, or from none; 0 when
  allowed, else the seconds until it would be (GCRA, below). Redis: one `EVALSHA` over every
  bucket's key, on Redis's clock (`TIME`), so every replica shares the buckets; memory: the
  same algorithm in the process (bounded like its sessions). The rate limits of
  app/ratelimit.py and app/creation_limit.py are this operation.
Every failure to reach the store raises `StoreUnavailable`, never a backend-specific error.

Rate limits are GCRA token buckets: `count/period` lets a burst of up to `count` requests
through at once, then one every `period/count` on average. A bucket is one small key holding
its "theoretical arrival time" (milliseconds), which expires as soon as the bucket is full again.

Revisions: a stored value's revision is read from its first bytes, `{"v":<digits>,"r":<digits>,`
(`revision_of`); a value without that prefix (an older format, a hand-written value) has
revision `"0"`. The Redis script applies the same pattern, so both sides always agree. The
backends treat values otherwise as opaque bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

CasResult = Literal["ok", "conflict", "missing"]

# Keep in sync with the Lua pattern in app/sessions/redis_scripts.py (`_REVISION_PATTERN`).
REVISION_RE = re.compile(rb'^\{"v":\d+,"r":(\d+),')


def revision_of(value: bytes) -> str:
    """The revision recorded at the start of a stored value, `"0"` when there is none."""
    match = REVISION_RE.match(value)
    return match.group(1).decode("ascii") if match else "0"


class StoreUnavailable(Exception):
    """The session store did not answer within its deadline (down, frozen, full, read-only)."""


class StoreFull(StoreUnavailable):
    """The store refused a write for lack of memory (Redis `OOM`: `maxmemory` reached with the
    `noeviction` policy). Reads and deletes still work; answered 503 `session_store_full`."""


@dataclass(frozen=True, slots=True)
class TokenBucket:
    """One rate limit to check (`rate_limit`): at most `count` requests per `period_seconds`,
    the bucket's state at `key`."""

    key: str
    count: int
    period_seconds: float

    @property
    def interval_ms(self) -> float:
        return self.period_seconds * 1000 / self.count

    @property
    def period_ms(self) -> float:
        return self.period_seconds * 1000.0


class SessionBackend(Protocol):
    async def get_and_touch(self, key: str, ttl: int) -> bytes | None: ...

    async def peek(self, key: str) -> tuple[bytes, float | None] | None: ...

    async def expire(self, key: str, ttl: int) -> None: ...

    async def create(self, key: str, value: bytes, ttl: int) -> bool: ...

    async def compare_and_set(
        self, key: str, expected: str, value: bytes, ttl: int
    ) -> CasResult: ...

    async def delete_if_revision(self, key: str, expected: str) -> CasResult: ...

    async def delete_unless_revision(self, key: str, kept: str) -> CasResult: ...

    async def replace(self, key: str, value: bytes, ttl: int) -> bytes | None: ...

    async def delete(self, key: str) -> None: ...

    async def ping(self) -> None: ...

    async def rate_limit(self, buckets: Sequence[TokenBucket]) -> float: ...

    async def close(self) -> None: ...
