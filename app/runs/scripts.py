"""The Lua scripts of runs in Redis (app/runs/store.py): each one command to send and parse,
touching the keys of one run (one hash tag: one Redis Cluster slot) or one application's budget
counter. Each comment says its KEYS and ARGV and why it is a script."""

from __future__ import annotations

from app.sessions.redis_scripts import LuaScript

# KEYS: meta, heartbeat, events. ARGV: owner, application id, ttl ms, heartbeat ms. The
# events stream is created empty with its TTL (a consumer group created with `MKSTREAM` and
# destroyed at once leaves an empty stream of ~380 bytes), so the pump's writes are one
# `XADD NOMKSTREAM` each, without a `PEXPIRE` (`append`, `exists=True`). A retry after a lost
# reply finds the stream and creates (and destroys) the group on it.
CREATE_RUN = LuaScript.of(
    """redis.call('HSET', KEYS[1], 'o', ARGV[1], 'a', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
redis.pcall('XGROUP', 'CREATE', KEYS[3], 'c', '$', 'MKSTREAM')
redis.pcall('XGROUP', 'DESTROY', KEYS[3], 'c')
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return 1"""
)

# KEYS: meta, events, largest entry. ARGV: ttl ms (the window), entry id, first seq ('' for
# a bare end marker), data, end reason, last event's seq, the largest-entry bucket ('' none),
# owner, application id. A run whose whole answer had arrived when it started
# (`RunRegistry.start_ended`): created ended, its events and its end in one entry, in one
# command instead of `CREATE_RUN` then `END_RUN`. The XADD goes first (at `maxmemory` Redis
# refuses it and nothing is written: the caller relays the answer without resume). A retry
# after a lost reply finds the meta hash and writes nothing again (the run id is new: nothing
# else made it). No heartbeat key: the meta's end (`x`, `l`) says it ended.
CREATE_ENDED = LuaScript.of(
    """if redis.call('EXISTS', KEYS[1]) == 1 then
  return 1
end
local xadd = {'XADD', KEYS[2], ARGV[2]}
if ARGV[3] ~= '' then
  xadd[#xadd + 1] = 'f'; xadd[#xadd + 1] = ARGV[3]; xadd[#xadd + 1] = 'd'; xadd[#xadd + 1] = ARGV[4]
end
xadd[#xadd + 1] = 'x'; xadd[#xadd + 1] = ARGV[5]
local added = redis.pcall(unpack(xadd))
if type(added) == 'table' and added.err then
  return added
end
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'o', ARGV[8], 'a', ARGV[9], 'x', ARGV[5], 'l', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if ARGV[7] ~= '' then
  redis.call('SET', KEYS[3], ARGV[7], 'PX', ARGV[1])
end
return 1"""
)

# KEYS: meta, events, largest entry. ARGV: ttl ms, MINID ('' none), entry id, first seq (''
# for a bare end marker), data, end reason, last event's seq, the run's new largest-entry
# bucket ('' unchanged: `GROWN_XADD`). The heartbeat key is left to expire: readers see
# the end first. The end reason and the last seq also go into the meta hash (`x`, `l`; only
# while it exists), so that `meta` of an ended run never reads the stream. The XADD goes
# first: at `maxmemory` Redis refuses a script's first write (OOM) but lets a script that has
# written go on, so a PEXPIRE first would let the XADD past `maxmemory` (attack-budget-2). The
# TTLs are set whatever the XADD answered (PEXPIRE is never refused), so the run's keys never
# outlive their window (attack-budget F6).
END_RUN = LuaScript.of(
    """local xadd = {'XADD', KEYS[2]}
if ARGV[2] ~= '' then
  xadd[#xadd + 1] = 'MINID'; xadd[#xadd + 1] = '='; xadd[#xadd + 1] = ARGV[2]
end
xadd[#xadd + 1] = ARGV[3]
if ARGV[4] ~= '' then
  xadd[#xadd + 1] = 'f'; xadd[#xadd + 1] = ARGV[4]; xadd[#xadd + 1] = 'd'; xadd[#xadd + 1] = ARGV[5]
end
xadd[#xadd + 1] = 'x'; xadd[#xadd + 1] = ARGV[6]
local added = redis.pcall(unpack(xadd))
local meta = redis.pcall('PEXPIRE', KEYS[1], ARGV[1])
redis.pcall('PEXPIRE', KEYS[2], ARGV[1])
redis.pcall('PEXPIRE', KEYS[3], ARGV[1])
if type(added) == 'table' and added.err and not string.find(added.err, 'equal or smaller') then
  return added
end
if ARGV[8] ~= '' then
  redis.pcall('SET', KEYS[3], ARGV[8], 'PX', ARGV[1])
end
if meta == 1 then
  redis.pcall('HSET', KEYS[1], 'x', ARGV[6], 'l', ARGV[7])
end
return 1"""
)

# KEYS: events, largest-entry bucket. ARGV: start ('(0-<after>'), most entries, bytes, the
# largest entry `resume_max_bytes` allows (when the bucket is missing), the fewest of the
# largest entries a plain `XRANGE` reads. The catch-up read of a run whose largest entries are
# too big for a plain `XRANGE` of 16 of them
# (app/runs/store.py `range_after`): `XRANGE`s of a few entries at a time, stopping after the
# entry whose events take the reply past ARGV[3] (attack-replay-7: a count grown over tiny
# entries read 16 entries of 250 KB, 4 MB, in one reply). A batch grows while the entries read
# are small enough for it to fit in the bytes left, up to as many of the run's largest entries
# as fit in the bytes (at most 16; one when they are larger): the entries a script holds are
# about ARGV[3], whatever their sizes (attack-gate-9: 16 of 4 MB read to return one took Redis
# 135 MiB past its peak and blocked it 0.3 s). Each `XRANGE` call seeks into its stream node
# again (up to 100 entries): one entry a call costs Redis ~20x the time of a plain walk per
# entry, the price of a run that mixes tiny and big entries (attack-gate-8). Same reply shape
# as `XRANGE`.
#
# KEYS[2] is the run's largest-entry bucket, read in the same step as the entries: a burst the
# pump wrote between a bucket read and a plain `XRANGE` sized by it came back in one reply of
# 16 entries, 4.0 MB (attack-10). With the bucket known and ARGV[5] or more of the largest
# fitting in ARGV[3], one `XRANGE` of as many as fit (a plain walk: runs of small entries).
CATCHUP_RANGE = LuaScript.of(
    """local start = ARGV[1]
local left = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local bucket = redis.call('GET', KEYS[2])
local largest_known = math.max(1, tonumber(bucket or ARGV[4]))
local fit = math.floor(limit / largest_known)
if bucket and fit >= tonumber(ARGV[5]) then
  return redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', math.min(left, fit))
end
local out = {}
local size = 0
local most = math.max(1, math.min(16, fit))
local batch = 1
while left > 0 do
  local got = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', math.min(batch, left))
  if #got == 0 then break end
  local largest = 1
  for _, entry in ipairs(got) do
    local fields = entry[2]
    local bytes = 0
    for i = 2, #fields, 2 do bytes = bytes + #fields[i] end
    out[#out + 1] = entry
    size = size + bytes
    left = left - 1
    if size > limit then return out end
    if bytes > largest then largest = bytes end
    start = '(' .. entry[1]
  end
  if #got < batch then break end
  batch = math.max(1, math.min(most, math.floor((limit - size) / largest)))
end
return out"""
)


# An application's runs in flight, per replica (`app.runs.budget.BudgetLedger`): KEYS[3] is a
# hash of `<replica>` -> the bytes its runs of the application hold in Redis but have not
# counted yet (plus a headroom), `<replica>:t` -> when that expires (Redis's clock, ms). Shared
# by the scripts below: `now`; `used` = both budget counters (KEYS[1], KEYS[2]); `others` = the
# live replicas' runs in flight but ARGV[1]'s (the caller counts its own). A replica that has
# not refreshed its field in time died: what its runs held counts as ended runs (added to the
# current counter, ARGV[2] its TTL) -- their keys stay for their window -- and a tombstone
# `<replica>:d` keeps that amount and `<replica>:s` the counter it went to (until `:t`, two
# windows, the hash kept at least that long): a replica that was only paused takes it back
# from that counter, while it is counted, with its next publish or count (`_TAKE_BACK`), so
# its runs are not counted twice (attack-11: a SIGSTOP past the TTL counted one run 2.06x;
# attack-14: taken back from the current counter one slot later, it uncounted another
# replica's ended run; dying with the hash after one window, it was not taken back: 1.83x).
_READ_BUDGET = """local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
local used = tonumber(redis.call('GET', KEYS[1]) or '0') + previous
local flight = redis.call('HGETALL', KEYS[3])
local fields = {}
for i = 1, #flight, 2 do fields[flight[i]] = flight[i + 1] end
local others, dead = 0, 0
for field, value in pairs(fields) do
  local suffix = string.sub(field, -2)
  if suffix == ':d' then
    local replica = string.sub(field, 1, -3)
    if fields[replica] == nil and tonumber(fields[replica .. ':t'] or '0') < now then
      redis.call('HDEL', KEYS[3], field, replica .. ':t', replica .. ':s')
    end
  elseif suffix ~= ':t' and suffix ~= ':s' then
    local expires = tonumber(fields[field .. ':t'] or '0')
    if expires < now then
      -- (a replica's field exists only after its publish took its tombstone back: one
      -- tombstone per replica at a time)
      dead = dead + tonumber(value)
      redis.call('HDEL', KEYS[3], field)
      redis.call('HSET', KEYS[3], field .. ':d', value, field .. ':s', KEYS[1])
      redis.call('HSET', KEYS[3], field .. ':t', now + tonumber(ARGV[2]))
      if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[2]) then
        redis.call('PEXPIRE', KEYS[3], ARGV[2])
      end
    elseif field ~= ARGV[1] then
      others = others + tonumber(value)
    end
  end
end
if dead > 0 then
  used = redis.call('INCRBY', KEYS[1], dead) + previous
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
-- The caller's own tombstone is not in its view: it counts its runs itself (a replica back
-- from a pause had its growth refused, its run cut, at 0.65x the budget: attack-15). Redis
-- keeps it, for the others, until the caller's next publish takes it back.
local mine = tonumber(redis.call('HGET', KEYS[3], ARGV[1] .. ':d') or '0')
if mine > 0 then
  local counter = redis.call('HGET', KEYS[3], ARGV[1] .. ':s')
  if counter == KEYS[1] or counter == KEYS[2] then
    used = used - math.min(mine, tonumber(redis.call('GET', counter) or '0'))
  end
end
"""

# Set ARGV[1]'s field of KEYS[3] to @FLIGHT@ bytes (0: remove) for @TTL@ ms (needs `now`);
# the hash lives @HASH_TTL@ ms (the field's TTL plus a window: a dead replica's field is still
# there for a check to count it while its runs' keys last).
_TAKE_BACK = """local tomb = tonumber(redis.call('HGET', KEYS[3], ARGV[1] .. ':d') or '0')
if tomb > 0 then
  local counter = redis.call('HGET', KEYS[3], ARGV[1] .. ':s')
  local back = math.min(tomb, @BACK@)
  if back < tomb then
    redis.call('HSET', KEYS[3], ARGV[1] .. ':d', tomb - back)
  else
    redis.call('HDEL', KEYS[3], ARGV[1] .. ':d', ARGV[1] .. ':t', ARGV[1] .. ':s')
  end
  for _, key in ipairs({KEYS[1], KEYS[2]}) do
    if key == counter then
      local take = math.min(back, tonumber(redis.call('GET', key) or '0'))
      if take > 0 then
        redis.call('DECRBY', key, take)
      end
    end
  end
end
"""

# A publish takes the whole tombstone back (its field holds its runs again); a count of ended
# runs only what it counts (its runs still in flight stay in the tombstone until its next
# publish: taken back whole by a count, they counted nowhere, attack-16).
_PUBLISH_FLIGHT = (
    _TAKE_BACK.replace("@BACK@", "tomb")
    + """if tonumber(@FLIGHT@) <= 0 then
  redis.call('HDEL', KEYS[3], ARGV[1], ARGV[1] .. ':t')
else
  redis.call('HSET', KEYS[3], ARGV[1], @FLIGHT@, ARGV[1] .. ':t', now + tonumber(@TTL@))
  if redis.call('PTTL', KEYS[3]) < tonumber(@HASH_TTL@) then
    redis.call('PEXPIRE', KEYS[3], @HASH_TTL@)
  end
end
"""
)


# KEYS: an application's budget counters (current slot, previous), runs in flight. ARGV:
# replica, bytes, TTL ms. A paused replica's tombstone is taken back first (`_TAKE_BACK`).
BUDGET_ADD = LuaScript.of(
    _TAKE_BACK.replace("@BACK@", "tonumber(ARGV[2])")
    + """local used = redis.call('INCRBY', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return used"""
)


def _publish_flight(flight: str, ttl: str, hash_ttl: str) -> str:
    return (
        _PUBLISH_FLIGHT.replace("@FLIGHT@", flight)
        .replace("@TTL@", ttl)
        .replace("@HASH_TTL@", hash_ttl)
    )


# KEYS: current counter, previous counter, runs in flight. ARGV: replica, counter TTL ms.
# Returns what the application's runs hold in Redis: ended (counted) + other replicas' in flight.
BUDGET_READ = LuaScript.of(_READ_BUDGET + "return used + others")

# KEYS: as BUDGET_READ. ARGV: replica, counter TTL ms, what the caller holds uncounted, budget,
# its new in-flight field, that field's TTL ms, the hash's TTL ms. Admits a run while used +
# others + uncounted is under the budget, and then publishes the caller's field in the same
# step: a check on another replica sees it (near the budget,
# `app.runs.budget.BudgetLedger.admit`). Returns {used + others, 1 admitted / 0 not}.
BUDGET_RESERVE = LuaScript.of(
    _READ_BUDGET
    + """if used + others + tonumber(ARGV[3]) >= tonumber(ARGV[4]) then
  return {used + others, 0}
end
"""
    + _publish_flight("ARGV[5]", "ARGV[6]", "ARGV[7]")
    + "return {used + others, 1}"
)

# KEYS: -, -, runs in flight (KEYS[1..2] unused, kept for one key layout). ARGV: replica, bytes
# (0: remove), TTL ms, the hash's TTL ms.
PUBLISH_FLIGHT = LuaScript.of(
    """local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""
    + _publish_flight("ARGV[2]", "ARGV[3]", "ARGV[4]")
    + "return 1"
)

# KEYS: meta. A cut run's end where it ran (`f`), only while the meta exists.
MARK_FINISHED = LuaScript.of(
    """if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'f', '1')
  return 1
end
return 0"""
)

# KEYS: meta, heartbeat. A stop sets the flag only on a run that still has its meta key: an
# HSET on a key that just expired would create it again without a TTL (attack-budget-2).
# Returns 0: no meta; 1: set, the run's heartbeat key alive; 2: set, its heartbeat key gone
# (its replica ended it, died, or is stalled: the flag waits for its next tick, attack-15).
REQUEST_STOP = LuaScript.of(
    """if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'stop', '1')
  return 2 - redis.call('EXISTS', KEYS[2])
end
return 0"""
)

# KEYS: events, largest entry. ARGV: TTL ms, the new largest-entry bucket, then the `XADD`
# arguments after the key. An entry larger than any before it goes in with the run's new
# largest-entry bucket, atomically, so a catch-up read (`CATCHUP_RANGE`) never meets an entry
# larger than the key says. `NOMKSTREAM` first; a stream gone meanwhile is written again with
# its TTL. The `XADD` goes first (at `maxmemory` a script's first write is refused).
GROWN_XADD = LuaScript.of(
    """local args = {}
for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
local added = redis.pcall('XADD', KEYS[1], 'NOMKSTREAM', unpack(args))
if added == false then
  added = redis.pcall('XADD', KEYS[1], unpack(args))
  redis.pcall('PEXPIRE', KEYS[1], ARGV[1])
end
if type(added) == 'table' and added.err and not string.find(added.err, 'equal or smaller') then
  return added
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[1])
return 1"""
)
