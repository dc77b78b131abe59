"""What a load run is asked to do (`LoadConfig`, the request kinds and defaults) and what it
recorded (`Recorder`: counts, errors by kind, latency histograms, the continuity tally; the
`resume` kind's `ResumeCounts`); `report.build_report` turns a recording into figures."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

from app.loadkit.stats import Latency, Timeline

SESSION_KINDS = ("create", "read", "write")
KINDS = (*SESSION_KINDS, "stream", "resume")
MIX_KINDS = ("read", "write", "stream", "resume")
DEFAULT_MIX: Mapping[str, float] = {"read": 60.0, "write": 20.0, "stream": 20.0}
# What the built-in demo agent (`upstream = "builtin:demo"`) answers, and the stub too: with no
# options, `scripts/run` + `agent-bff-loadgen` is a meaningful run.
DEFAULT_AGENT_PATH = "chat"
DEFAULT_STREAM_BODY = '{"message": "hello"}'


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadConfig:
    """What to run. Durations in seconds."""

    url: str
    app: str = "demo"
    concurrency: int = 10
    duration: float = 10.0
    ramp_up: float = 0.0
    max_requests: int | None = None
    mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    think_time: float = 0.0
    timeout: float = 10.0
    stream_idle_timeout: float = 30.0
    agent_path: str = DEFAULT_AGENT_PATH
    stream_body: bytes = DEFAULT_STREAM_BODY.encode()
    end_event: str = "done"
    payload_bytes: int = 64
    grace: float = 5.0
    verify_at_end: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)
    seed: int | None = None
    # `resume`: the connection is dropped after 1..resume_cut_max events, then the run is
    # resumed (GET .../runs/<id> with Last-Event-ID), up to resume_attempts times.
    resume_cut_max: int = 20
    resume_attempts: int = 3


def classify(err: BaseException) -> str:
    """An exception as an error kind: timeout, connect, reset, or client_error."""
    if isinstance(err, TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(err, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(
        err,
        aiohttp.ServerDisconnectedError
        | aiohttp.ClientOSError
        | aiohttp.ClientPayloadError
        | ConnectionError,
    ):
        return "reset"
    return "client_error"


class Recorder:
    """Everything measured during one run; `report.build_report` turns it into figures."""

    def __init__(self, planned_seconds: float) -> None:
        self.t0 = time.perf_counter()
        self.latency: dict[str, Latency] = {kind: Latency() for kind in KINDS}
        self.count: Counter[str] = Counter()
        self.ok: Counter[str] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.ttfe = Latency()
        self.gaps = Latency()
        self.streams_started = 0
        self.streams_completed = 0
        self.stream_events = 0
        self.stream_bytes = 0
        self.keepalive_comments = 0
        self.sessions_created = 0
        self.sessions_recreated = 0
        self.checks = 0
        self.lost = 0
        self.stale = 0
        self.users_with_loss: set[int] = set()
        self.aborted = 0
        self.timeline = Timeline(planned_seconds)
        self.active_users = 0
        self.started_at = time.time()
        self.finished: float | None = None
        self.resume = ResumeCounts()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def success(self, kind: str, started: float, seconds: float) -> None:
        self.count[kind] += 1
        self.ok[kind] += 1
        self.latency[kind].record(seconds)
        self.timeline.record(kind, started, seconds)

    def failure(self, kind: str, started: float, error: str) -> None:
        self.count[kind] += 1
        self.errors[(kind, error)] += 1
        self.timeline.record(kind, started, None)

    @property
    def total(self) -> int:
        return sum(self.count.values())

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())


@dataclass(slots=True)
class ResumeCounts:
    """The `resume` kind's tally. `lost`/`duplicated` count events of runs that ended (done or
    an error other than `run_orphaned`); a run whose pumping replica died (`run_orphaned`)
    is counted in `orphaned` only (its tail is lost by design)."""

    runs: int = 0  # agent requests that answered with a run (X-Run-Id)
    unresumable: int = 0  # 200 answers without X-Run-Id
    resumed: int = 0  # resume requests sent
    completed: int = 0  # runs read to their end event
    lost: int = 0
    duplicated: int = 0
    orphaned: int = 0
    error_events: Counter[str] = field(default_factory=Counter)
