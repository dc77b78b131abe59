"""The key-value contract every session backend implements (memory, Redis).

Each method is one store operation on one key:
- `get_and_touch(key, ttl)`: the value, with its TTL reset to `ttl` (Redis `GETEX key EX ttl`);
  `None` when missing or expired.
- `create(key, value, ttl)`: store only if absent (`SET NX EX`); False if it existed.
- `update(key, value, ttl)`: store only if present (`SET XX EX`); False if it was deleted, so a
  write racing a logout never brings the session back.
- `delete(key)`: remove (idempotent).
- `ping()`: raises unless the store answers.
Every failure to reach the store raises `StoreUnavailable`, never a backend-specific error.
"""

from __future__ import annotations

from typing import Protocol


class StoreUnavailable(Exception):
    """The session store did not answer within its deadline (down, frozen, full, read-only)."""


class SessionBackend(Protocol):
    async def get_and_touch(self, key: str, ttl: int) -> bytes | None: ...

    async def create(self, key: str, value: bytes, ttl: int) -> bool: ...

    async def update(self, key: str, value: bytes, ttl: int) -> bool: ...

    async def delete(self, key: str) -> None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
