"""The Lua scripts of the Redis backend (compare-and-set, conditional deletes, the rate
limit), each a `LuaScript` run with `EVALSHA`, on one session key or one slot's buckets."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from app.sessions.backend import CasResult

# Sends one command (`"GETEX", key, "EX", 60`) and returns its reply: the auto-pipeliner's
# `execute`, or a client's `execute_command`.
Execute = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script run with `EVALSHA`, falling back to `EVAL` (which also caches it on that
    server) when the server does not know it yet (`NOSCRIPT`: first use, restart, failover,
    another cluster node). One round trip in the steady state."""

    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> LuaScript:
        return cls(source, hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest())

    async def run(self, execute: Execute, keys: list[str], args: list[Any]) -> Any:
        try:
            return await execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await execute("EVAL", self.source, len(keys), *keys, *args)


# The revision of a stored value: keep in sync with `app.sessions.backend.REVISION_RE`.
_REVISION_PATTERN = '^{"v":%d+,"r":(%d+),'

# KEYS[1] session key; ARGV[1] expected revision, ARGV[2] new value, ARGV[3] TTL (seconds).
# Revisions are compared as strings (no float rounding of large numbers in Lua).
COMPARE_AND_SET = LuaScript.of(
    f"""local current = redis.call('GET', KEYS[1])
if not current then return 'missing' end
local revision = string.match(current, '{_REVISION_PATTERN}') or '0'
if revision ~= ARGV[1] then return 'conflict' end
redis.call('SET', KEYS[1], ARGV[2], 'XX', 'EX', ARGV[3])
return 'ok'"""
)

# KEYS[1] session key; ARGV[1] expected revision.
DELETE_IF_REVISION = LuaScript.of(
    f"""local current = redis.call('GET', KEYS[1])
if not current then return 'missing' end
local revision = string.match(current, '{_REVISION_PATTERN}') or '0'
if revision ~= ARGV[1] then return 'conflict' end
redis.call('DEL', KEYS[1])
return 'ok'"""
)

# KEYS[1] session key; ARGV[1] the revision that is kept (a rotation tombstone's).
DELETE_UNLESS_REVISION = LuaScript.of(
    f"""local current = redis.call('GET', KEYS[1])
if not current then return 'missing' end
local revision = string.match(current, '{_REVISION_PATTERN}') or '0'
if revision == ARGV[1] then return 'conflict' end
redis.call('DEL', KEYS[1])
return 'ok'"""
)

# KEYS: one per bucket (same hash slot). ARGV: interval_ms, period_ms per bucket (GCRA, as
# `app.sessions.memory.gcra`, on Redis's clock). Answers 0 (allowed, every bucket updated) or
# the milliseconds to wait (nothing updated).
RATE_LIMIT = LuaScript.of(
    """local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wait = 0
local tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - period
  if allow_at - now > wait then wait = allow_at - now end
  tats[i] = new_tat
end
if wait > 0 then return math.ceil(wait) end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.3f', tats[i]), 'PX', math.ceil(tats[i] - now))
end
return 0"""
)

_CAS_RESULTS: dict[bytes, CasResult] = {b"ok": "ok", b"conflict": "conflict", b"missing": "missing"}


def cas_result(reply: Any) -> CasResult:
    value = reply.encode() if isinstance(reply, str) else bytes(reply)
    return _CAS_RESULTS[value]
