"""What a run costs Redis, as an application's budget counts it (`redis_cost`, `run_cost`),
and what this replica's runs cost that Redis does not count yet (`UncountedCosts`): the
budget's arithmetic, apart from its ledger (app/runs/budget.py)."""

from __future__ import annotations

from app.runs.log import RunLog

# Redis's memory for a run beyond its framed bytes (measured on Redis 7.0, `MEMORY USAGE` and
# `used_memory`, by two outside attacks): the allocator's size classes (up to a quarter more: a
# 512 KiB entry takes a 640 KiB allocation); per stream entry ~17-24 bytes, but an entry of
# ~2 KiB sits alone in a stream node shrunk to a 2560-byte allocation plus ~260 bytes of index
# (2031 framed bytes held 2831: a third more, plus 160 per entry, covers it with ~2 % to spare);
# per run its keys and the stream's first node (~4.7-5.0 KiB, even for a run without events).
_ALLOCATOR_SLACK_DIVISOR = 3
ENTRY_OVERHEAD_BYTES = 160
RUN_OVERHEAD_BYTES = 6 * 1024


def redis_cost(framed_bytes: int, entries: int, *, runs: int = 1) -> int:
    """The memory (bytes) Redis is assumed to need for `runs` runs holding `framed_bytes`
    framed bytes in at most `entries` stream entries: what the application's budget counts."""
    return (
        framed_bytes
        + framed_bytes // _ALLOCATOR_SLACK_DIVISOR
        + entries * ENTRY_OVERHEAD_BYTES
        + runs * RUN_OVERHEAD_BYTES
    )


def run_cost(log: RunLog, entry_bytes: int) -> int:
    """What one run with `log` costs Redis: the events its log holds (at most one entry each)
    plus, once the log has dropped its oldest events, one more entry of `entry_bytes`: the
    stream's oldest entry may still hold events the log no longer has (trimming keeps an entry
    while its last event is kept)."""
    events = log.next_seq - log.first_seq
    if log.first_seq > 1:
        return redis_cost(log.bytes + entry_bytes, events + 1)
    return redis_cost(log.bytes, events)


class UncountedCosts:
    """Per application: what its runs in this process cost Redis that its Redis counter does
    not count yet. Each run reports changes of its cost (`add`) and takes it back when its end
    is counted (or will never be)."""

    __slots__ = ("_by_app",)

    def __init__(self) -> None:
        self._by_app: dict[str, int] = {}

    def get(self, app_id: str) -> int:
        return self._by_app.get(app_id, 0)

    def apps(self) -> list[str]:
        """The applications with an uncounted cost."""
        return list(self._by_app)

    def add(self, app_id: str, delta: int) -> None:
        """Add `delta` (negative: remove) to `app_id`'s uncounted cost."""
        left = self._by_app.get(app_id, 0) + delta
        if left > 0:
            self._by_app[app_id] = left
        else:
            self._by_app.pop(app_id, None)
