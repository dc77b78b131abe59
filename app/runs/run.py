"""A run in this process: its state (`Run`), the process's run counters (`RunCounters`), what
binds a run to its session (`owner_of`) and the `event: error` that ends a run otherwise than
`done` (`error_event`, `ERROR_MESSAGES`). The registry and the pump: `app.runs.runs`."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.applications import AppConfig
from app.runs.log import RunLog

if TYPE_CHECKING:
    from app.runs.writer import RunWriter

ERROR_MESSAGES = {
    "upstream_stream_error": "The agent service stream broke off.",
    "upstream_idle_timeout": "The agent service sent nothing for too long.",
    "upstream_event_too_large": "The agent service sent an event larger than a run keeps.",
    "shutting_down": "The instance running this answer shut down; start a new one.",
    "run_stopped": "The run was stopped.",
    "run_expired": "Nobody read this run within its window; it was cancelled.",
    "run_limit_reached": "This run outgrew what is kept while nobody reads it; it was cancelled.",
    "run_store_unavailable": "The run store is unavailable; this run cannot continue.",
    "run_orphaned": "The instance running this answer is gone; the rest of it is lost.",
    "resume_too_old": "Events after your Last-Event-ID were dropped (the run's limits); "
    "this run cannot be resumed from there.",
    "run_over_budget": "This answer outgrew what its application may keep for resuming: it "
    "goes on where it started, but cannot be resumed elsewhere from here.",
}


# The end a run cut over its application's budget has in Redis (`RunRegistry._stop_keeping`).
CUT_REASON = "run_over_budget"


def owner_of(conversation_id: str) -> str:
    """What binds a run to its session: a hash of the session's conversation id (stable
    across session id rotations, never stored in clear next to the run)."""
    return hashlib.sha256(conversation_id.encode()).hexdigest()[:32]


def error_event(code: str, run_id: str) -> bytes:
    """The body of the `event: error` added to a run (framed by the log like any event)."""
    payload = {"code": code, "message": ERROR_MESSAGES.get(code, code), "run_id": run_id}
    return b"event: error\ndata: " + json.dumps(payload).encode()


@dataclass(eq=False, slots=True)
class Run:
    """A run pumped by this process (or recently ended here)."""

    run_id: str
    app: AppConfig
    owner: str
    log: RunLog
    local_readers: int = 0
    stop_requested: bool = False
    # The last sequence number known to have been reachable by a reader (see `_tick`).
    attached_seq: int = 0
    detached_at: float | None = None
    waiting: asyncio.Timeout | None = None
    task: asyncio.Task[None] | None = None
    writer: RunWriter | None = None
    # The largest-entry bucket written to Redis so far (app/runs/store.py `entry_bucket`).
    entry_bucket: int = 0
    # What this run costs Redis as counted in its registry's `uncounted` (app/runs/budget.py):
    # from its start at least `reserved`, its application's typical run cost here.
    uncounted: int = 0
    reserved: int = 0
    # Its cost was handed to its application's counter (at its end: `BudgetLedger.add`).
    counted: bool = False
    # Its events go to Redis; False once its growth took its application over its budget
    # (`RunRegistry._stop_keeping`): it goes on in this process only, as on the memory store.
    kept: bool = True
    # A cut whose record in Redis failed, retried with its ticks and at its end: (the cut's
    # sequence number, the first kept, its cost).
    cut_pending: tuple[int, int, int] | None = None

    def wake(self) -> None:
        """Cut the pump's current wait short (a stop, the shutdown)."""
        waiting = self.waiting
        if waiting is not None and not waiting.expired():
            waiting.reschedule(asyncio.get_running_loop().time())


@dataclass(slots=True)
class RunCounters:
    started: int = 0
    # Of those, the runs created ended: their whole answer had arrived when they started.
    whole: int = 0
    unresumable: int = 0
    # Of those, the runs relayed without resume because their application was over its budget.
    over_budget: int = 0
    # Of those, the runs relayed without resume because their client was over its run rate.
    rate_limited: int = 0
    # Runs whose events stopped going to Redis mid-way: their growth took their application
    # over its budget.
    cut_over_budget: int = 0
    resumes: int = 0
    replayed_events: int = 0
    orphaned: int = 0
    expired: int = 0
    evicted: int = 0
    ended: dict[str, int] = field(default_factory=dict)
