"""Each application's budget of run data in Redis (`resume_redis_budget_bytes`, F3): what a run
is assumed to cost Redis, and the bytes this replica's runs hold but have not counted yet.

The counters themselves live in Redis (`app.runs.store.RedisRunStore.budget_used` /
`budget_add`): a run's cost is added when its end is recorded. Until then its bytes are only
known here, so a new run's check adds this replica's `UncountedBytes` of its application: a
client that starts its next run as soon as the last one's answer has arrived (before its end
is recorded) is not missed.
"""

from __future__ import annotations

# Redis's memory for a run's stream beyond its framed bytes: the allocator's size classes (up to
# a quarter more: a 512 KiB entry takes a 640 KiB allocation) and, per run, its keys and stream
# nodes. Measured: runs of 3.5 MiB in 512 KiB events took about 4.4 MiB of `used_memory` each.
_ALLOCATOR_SLACK_DIVISOR = 4
_RUN_OVERHEAD_BYTES = 4096


def redis_cost(framed_bytes: int) -> int:
    """The memory (bytes) Redis is assumed to need for runs of `framed_bytes` framed bytes:
    what the application's budget counts (0 for none)."""
    if framed_bytes <= 0:
        return 0
    return framed_bytes + framed_bytes // _ALLOCATOR_SLACK_DIVISOR + _RUN_OVERHEAD_BYTES


class UncountedBytes:
    """Per application: the framed bytes its runs in this process hold that its Redis counter
    does not count yet. Each run reports its total (`note`) and leaves when counted (`drop`)."""

    __slots__ = ("_by_app",)

    def __init__(self) -> None:
        self._by_app: dict[str, int] = {}

    def get(self, app_id: str) -> int:
        return self._by_app.get(app_id, 0)

    def add(self, app_id: str, delta: int) -> None:
        """Add `delta` (negative: remove) to `app_id`'s uncounted bytes."""
        left = self._by_app.get(app_id, 0) + delta
        if left > 0:
            self._by_app[app_id] = left
        else:
            self._by_app.pop(app_id, None)
