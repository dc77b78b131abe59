"""Virtual users against a running gateway (or a load balancer in front of several).

Each virtual user (VU) is one browser: its own `aiohttp.ClientSession` and cookie jar, one
request at a time. It creates a session (`PATCH .../session`), then picks read (`GET`), write
(`PATCH`) or stream (`POST .../agent/<path>`, read as SSE) by the configured mix until the
duration or the request cap is reached, then verifies its session once more.

Session continuity: every VU remembers what it wrote (a random token and a counter) and checks
every session it reads back. A session that no longer holds the token is *lost* (expired,
evicted, flushed, or living on another replica); one holding the token but an older counter is
*stale* (a write went missing). Either is counted once and the VU re-creates its session.

It always stops by itself: no request starts after `duration`; in-flight requests get `grace`
seconds; then everything still running is cancelled (counted as `aborted`, not as errors).
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from app.loadkit.sse import SSEParser
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


class Tickets:
    """The request cap shared by all VUs (None: unlimited)."""

    def __init__(self, cap: int | None) -> None:
        self.left = cap

    def take(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


class VirtualUser:
    """One browser: its own cookie jar and connection, one request at a time."""

    def __init__(self, index: int, config: LoadConfig, recorder: Recorder, rng: random.Random):
        self.index = index
        self.config = config
        self.rec = recorder
        self.rng = rng
        self.token = secrets.token_hex(8)
        self.n = 0
        self.has_session = False
        self.created_once = False
        base = config.url.rstrip("/")
        self.session_url = f"{base}/apps/{config.app}/session"
        self.agent_url = f"{base}/apps/{config.app}/agent/{config.agent_path.lstrip('/')}"
        self.runs_url = f"{base}/apps/{config.app}/runs/"
        self.pad = "x" * config.payload_bytes
        kinds = [k for k in MIX_KINDS if config.mix.get(k, 0) > 0]
        self.kinds = kinds
        self.weights = [config.mix[k] for k in kinds]

    def expected(self) -> dict[str, Any]:
        return {"lg_user": self.index, "lg_token": self.token, "lg_n": self.n, "lg_pad": self.pad}

    async def run(self, http: aiohttp.ClientSession, end: float, tickets: Tickets) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < end and tickets.take():
            if not self.has_session:
                await self.create(http)
            else:
                kind = self.rng.choices(self.kinds, self.weights)[0]
                if kind == "read":
                    await self.read(http)
                elif kind == "write":
                    await self.write(http)
                elif kind == "resume":
                    await self.resume(http)
                else:
                    await self.stream(http)
            if self.config.think_time > 0:
                await asyncio.sleep(self.config.think_time * self.rng.uniform(0.5, 1.5))

    async def verify(self, http: aiohttp.ClientSession) -> None:
        """The final continuity check (only for a VU that holds a session)."""
        if self.has_session:
            await self.read(http)

    # -- continuity ---------------------------------------------------------------------------

    def check(self, data: Any) -> None:
        """Compare what the gateway returned with what this VU wrote."""
        if not isinstance(data, dict) or data.get("lg_token") != self.token:
            self.lose()
        elif data.get("lg_n") != self.n or data.get("lg_pad") != self.pad:
            self.lose(stale=True)
        else:
            self.rec.checks += 1

    def lose(self, *, stale: bool = False) -> None:
        """Count a failed continuity check; the next step re-creates (rewrites) the session."""
        self.rec.checks += 1
        if stale:
            self.rec.stale += 1
        else:
            self.rec.lost += 1
        self.rec.users_with_loss.add(self.index)
        self.has_session = False

    # -- requests -----------------------------------------------------------------------------

    async def _json_request(
        self, http: aiohttp.ClientSession, kind: str, method: str, body: Any | None
    ) -> Any | None:
        """One session API request; returns the response's `data` on 200, None on failure."""
        headers = dict(self.config.headers)
        payload = None
        if body is not None:
            headers["X-CSRF"] = "1"
            headers["Content-Type"] = "application/json"
            payload = json.dumps(body).encode()
        started = self.rec.now()
        t = time.perf_counter()
        try:
            async with http.request(
                method,
                self.session_url,
                data=payload,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            ) as resp:
                raw = await resp.read()
                elapsed = time.perf_counter() - t
                if resp.status != 200:
                    self.rec.failure(kind, started, f"status_{resp.status}")
                    if resp.status == 409 and _error_code(raw) == "session_ended":
                        # The gateway refused to resurrect a session deleted meanwhile: for a
                        # user that never logs out, that session was lost.
                        self.lose()
                    return None
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            self.rec.failure(kind, started, classify(err))
            return None
        try:
            data = json.loads(raw)["data"]
        except (ValueError, KeyError, TypeError):
            self.rec.failure(kind, started, "bad_body")
            return None
        self.rec.success(kind, started, elapsed)
        return data

    async def create(self, http: aiohttp.ClientSession) -> None:
        data = await self._json_request(http, "create", "PATCH", self.expected())
        if data is None:
            return
        self.has_session = True
        if self.created_once:
            self.rec.sessions_recreated += 1
        else:
            self.rec.sessions_created += 1
        self.created_once = True
        self.check(data)

    async def read(self, http: aiohttp.ClientSession) -> None:
        data = await self._json_request(http, "read", "GET", None)
        if data is not None:
            self.check(data)

    async def write(self, http: aiohttp.ClientSession) -> None:
        self.n += 1
        data = await self._json_request(http, "write", "PATCH", {"lg_n": self.n})
        if data is not None:
            self.check(data)
        else:
            # Unknown whether it was stored: resynchronise everything on the next step.
            self.has_session = False

    async def stream(self, http: aiohttp.ClientSession) -> None:
        """One agent request read as SSE: TTFE, gaps, completion (the end event), errors.

        Nothing is recorded for a stream cancelled at the hard deadline (it is `aborted`).
        """
        rec = self.rec
        headers = {
            **self.config.headers,
            "X-CSRF": "1",
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
        }
        started = rec.now()
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.config.timeout,
            sock_connect=self.config.timeout,
            sock_read=self.config.stream_idle_timeout,
        )
        read = StreamRead(self.config.end_event, t0=time.perf_counter())
        try:
            async with http.post(
                self.agent_url, data=self.config.stream_body, headers=headers, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    await resp.read()
                    rec.failure("stream", started, f"status_{resp.status}")
                    return
                read.began = True
                async for chunk in resp.content.iter_any():
                    read.feed(chunk)
                elapsed = time.perf_counter() - read.t0
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            kind = classify(err)
            if read.began and kind in ("reset", "client_error"):
                kind = "truncated" if isinstance(err, aiohttp.ClientPayloadError) else "reset"
            read.record(rec, started)
            rec.failure("stream", started, kind)
            return
        read.record(rec, started)
        error = read.error()
        if error is not None:
            rec.failure("stream", started, error)
        else:
            rec.streams_completed += 1
            rec.success("stream", started, elapsed)

    async def resume(self, http: aiohttp.ClientSession) -> None:
        """A resumable agent request cut after a random number of events (1 to
        `resume_cut_max`), then resumed with `Last-Event-ID` (again after a failed attempt, like
        `EventSource`); every gateway id must arrive exactly once, in order, up to the end."""
        rec, config = self.rec, self.config
        headers = {
            **config.headers,
            "X-CSRF": "1",
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
        }
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.timeout, sock_read=config.stream_idle_timeout
        )
        started = rec.now()
        t = time.perf_counter()
        run = RunRead(config.end_event)
        cut = self.rng.randint(1, max(1, config.resume_cut_max))
        run_id: str | None = None
        try:
            async with http.post(
                self.agent_url, data=config.stream_body, headers=headers, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    await resp.read()
                    rec.failure("resume", started, f"status_{resp.status}")
                    return
                run_id = resp.headers.get("X-Run-Id")
                if run_id is None:
                    rec.resume.unresumable += 1
                    rec.failure("resume", started, "unresumable")
                    return
                rec.resume.runs += 1
                async for chunk in resp.content.iter_any():
                    run.feed(chunk)
                    if run.finished or len(run.ids) >= cut:
                        break
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            if run_id is None:
                rec.failure("resume", started, classify(err))
                return
            # Otherwise a cut is what this kind is about: resume below.
        if run_id is None:
            return
        attempts = 0
        while not run.finished and attempts < config.resume_attempts:
            attempts += 1
            rec.resume.resumed += 1
            resume_headers = {**config.headers, "Accept": "text/event-stream"}
            if run.ids:
                resume_headers["Last-Event-ID"] = str(run.ids[-1])
            run.restart()
            try:
                async with http.get(
                    self.runs_url + run_id, headers=resume_headers, timeout=timeout
                ) as resp:
                    if resp.status == 204:
                        break
                    if resp.status != 200:
                        await resp.read()
                        continue
                    async for chunk in resp.content.iter_any():
                        run.feed(chunk)
            except (TimeoutError, aiohttp.ClientError, OSError):
                continue
        elapsed = time.perf_counter() - t
        run.tally(rec.resume)
        if run.error_code is not None:
            rec.failure("resume", started, run.error_code)
        elif not run.end_seen:
            rec.failure("resume", started, "truncated")
        else:
            rec.success("resume", started, elapsed)


class RunRead:
    """The events of one run over several connections: gateway ids, end, error code."""

    def __init__(self, end_event: str) -> None:
        self.end_event = end_event
        self.parser = SSEParser()
        self.ids: list[int] = []
        self.end_seen = False
        self.error_code: str | None = None

    @property
    def finished(self) -> bool:
        return self.end_seen or self.error_code is not None

    def restart(self) -> None:
        """A new connection: a half-read event of the old one is gone."""
        self.parser = SSEParser()

    def feed(self, chunk: bytes) -> None:
        for event in self.parser.feed(chunk):
            if event.id is not None and event.id.isdigit():
                self.ids.append(int(event.id))
            if event.type == "error":
                self.error_code = _error_code(b'{"error": ' + event.data.encode() + b"}") or "error"
            elif self.end_event and event.type == self.end_event:
                self.end_seen = True

    def tally(self, counts: ResumeCounts) -> None:
        if self.error_code is not None:
            counts.error_events[self.error_code] += 1
        if self.error_code == "run_orphaned":
            counts.orphaned += 1
            return
        if self.end_seen:
            counts.completed += 1
        distinct = set(self.ids)
        counts.duplicated += len(self.ids) - len(distinct)
        # Gateway ids run 1, 2, 3 ... without holes: a missing number is a lost event.
        counts.lost += (max(distinct) - len(distinct)) if distinct else 0


class StreamRead:
    """What one stream delivered: events with their arrival times, end marker, errors."""

    def __init__(self, end_event: str, *, t0: float) -> None:
        self.end_event = end_event
        self.t0 = t0
        self.began = False
        self.parser = SSEParser()
        self.arrivals: list[float] = []
        self.data_events = 0
        self.bytes = 0
        self.end_seen = False
        self.announced: int | None = None
        self.error_event = False

    def feed(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        events = self.parser.feed(chunk)
        if not events:
            return
        now = time.perf_counter()
        for event in events:
            self.arrivals.append(now)
            if event.type == "error":
                self.error_event = True
            elif self.end_event and event.type == self.end_event:
                self.end_seen = True
                self.announced = _announced_count(event.data)
            else:
                self.data_events += 1

    def record(self, rec: Recorder, started: float) -> None:
        """Add this stream's figures (once its outcome is known)."""
        if self.began:
            rec.streams_started += 1
        rec.stream_bytes += self.bytes
        rec.stream_events += len(self.arrivals)
        rec.keepalive_comments += self.parser.comments
        if self.arrivals:
            first = self.arrivals[0] - self.t0
            rec.ttfe.record(first)
            rec.timeline.record("ttfe", started, first)
            for before, after in zip(self.arrivals, self.arrivals[1:], strict=False):
                rec.gaps.record(after - before)

    def error(self) -> str | None:
        """None for a complete stream, else its error kind."""
        if self.error_event:
            return "stream_error"
        if self.end_event and not self.end_seen:
            return "truncated"
        if self.announced is not None and self.announced != self.data_events:
            return "truncated"
        if self.parser.pending:
            return "truncated"
        return None


def _error_code(raw: bytes) -> str | None:
    """The `code` of the gateway's JSON error envelope, if that is what `raw` is."""
    try:
        value = json.loads(raw)
        code = value["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def _announced_count(data: str) -> int | None:
    """The stub's end event carries `{"events": N}`: how many data events it sent."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    if isinstance(value, dict) and isinstance(value.get("events"), int):
        return int(value["events"])
    return None


async def run_load(
    config: LoadConfig,
    *,
    progress: Callable[[Recorder], None] | None = None,
    on_start: Callable[[Recorder], None] | None = None,
) -> Recorder:
    """Run `config` to completion (bounded by duration + grace) and return the recording.

    `progress` is called about once a second; `on_start` once, before the first request.
    """
    recorder = Recorder(config.duration)
    if on_start is not None:
        on_start(recorder)
    loop = asyncio.get_running_loop()
    begin = loop.time()
    end = begin + config.duration
    tickets = Tickets(config.max_requests)
    rng = random.Random(config.seed)
    users = [
        VirtualUser(i, config, recorder, random.Random(rng.random()))
        for i in range(config.concurrency)
    ]

    async def life(user: VirtualUser) -> None:
        delay = config.ramp_up * user.index / max(1, len(users))
        if delay:
            await asyncio.sleep(delay)
        jar = aiohttp.CookieJar(unsafe=True)  # the gateway is usually reached by IP here
        connector = aiohttp.TCPConnector(limit=2, ttl_dns_cache=300)
        async with aiohttp.ClientSession(cookie_jar=jar, connector=connector) as http:
            recorder.active_users += 1
            try:
                await user.run(http, end, tickets)
                if config.verify_at_end:
                    await user.verify(http)
            finally:
                recorder.active_users -= 1

    tasks = [asyncio.create_task(life(user)) for user in users]
    ticker = None
    if progress is not None:
        ticker = asyncio.create_task(_tick(recorder, progress))
    hard_deadline = config.duration + config.grace
    try:
        done, pending = await asyncio.wait(tasks, timeout=hard_deadline)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        recorder.aborted = len(pending)  # each VU has at most one request in flight
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                print(f"loadgen: a virtual user failed: {exc!r}", file=sys.stderr)
    finally:
        recorder.finished = recorder.now()
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
    return recorder


async def _tick(recorder: Recorder, progress: Callable[[Recorder], None]) -> None:
    while True:
        await asyncio.sleep(1.0)
        progress(recorder)
