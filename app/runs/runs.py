"""The run registry and the pump: a resumable agent stream keeps going without its browser.
(Over ~400 lines, on purpose: a run's start -- or its creation already ended, when its whole
answer is there -- pump, heartbeat, cut and end change its state and its budget cost
together, in one class; its Redis side, budget, log and readers live in their own modules.)

A run starts when an application with `resumable = true` answers an agent request with an
event stream (`app.runs.start.start_run`). From then on a pump task of this process owns the
upstream response and its capacity slots: it reads the upstream, splits it into events
(`SseParser`), appends each to the run's in-process log (readers here are woken at once) and,
with `SESSION_STORE=redis`, to the run's Redis stream (readers on other replicas,
`app.runs.store`). Browsers are readers; none of them leaving cancels the upstream.

The pump ends when
- the upstream's stream ends (`done`), breaks (`upstream_stream_error`) or is silent for the
  application's `idle_timeout_seconds` (`upstream_idle_timeout`);
- a stop is asked for (`run_stopped`: the stop endpoint here, or the run's `stop` field in
  Redis, read every heartbeat);
- nobody has read it for the application's `resume_window_seconds` (`run_expired`), or,
  while nobody reads, the log dropped events the last reader had not seen, so no resume
  could succeed any more (`run_limit_reached`);
- the replica's shutdown timeout passed (`shutting_down`: a draining replica keeps pumping
  until then; its pumps count as requests in flight), or Redis failed (`run_store_unavailable`).
Every end but `done` appends one `event: error` (`data: {"code", "message", "run_id"}`) with
its own id, so every reader learns it. Then the upstream response is released (complete) or
closed (which cancels the upstream), and the capacity slots are returned, exactly once.

Redis writes are group commits: a run has at most one `XADD` in flight (`RunWriter`,
app/runs/writer.py); the events that arrive meanwhile go out together in the next one, so a
burst costs one command per `ENTRY_BYTES` (app/runs/store.py) and order is kept. The pump
waits (upstream backpressure) when more than `WRITE_BACKLOG` events or `WRITE_BACKLOG_BYTES`
are waiting for Redis, and events the run's log has dropped are never written (nor held).

Every `RUN_HEARTBEAT_SECONDS` the pump refreshes its heartbeat key (TTL: 4 heartbeats), reads
the stop flag and the readers' presence key, and refreshes the keys' TTLs: one pipelined round
trip per run and heartbeat. An ended run stays readable for its window: from Redis (the copy
in this process is dropped once the end is recorded there), or, on the memory store, here:
at most `RUN_ENDED_MAX_RUNS` ended runs and `RUN_ENDED_MAX_BYTES` of their events per process
(with those whose end Redis did not record), the oldest ended forgotten first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator

import aiohttp

from app.applications import AppConfig
from app.config import Settings
from app.lifecycle import Lifecycle
from app.proxy.fastread import read_available
from app.runs.budget import BudgetLedger
from app.runs.costs import UncountedCosts, redis_cost, run_cost
from app.runs.entries import ENTRY_BYTES
from app.runs.log import RunLog
from app.runs.readers import ReaderCaps
from app.runs.run import CUT_REASON, Run, RunCounters, error_event
from app.runs.sse import FRAME_OVERHEAD, EventTooLarge, SseParser, frame_stream
from app.runs.store import RedisRunStore, RunMeta
from app.runs.writer import RunWriter
from app.sessions.backend import StoreFull, StoreUnavailable
from app.upstream import StreamStop

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 64 * 1024
# The heartbeat key lives this many heartbeats: a dead pumper is noticed within it.
HEARTBEAT_TTL_BEATS = 4
# A reader on another replica counts as present when it refreshed its key this recently.
_PRESENT_BEATS = 3
# Waiting for the pumps at cleanup (they were told to stop by the shutdown already).
_CLOSE_SECONDS = 2.0
# Events (or bytes of them) waiting for their Redis write beyond which the pump stops reading
# the upstream (attack-10: bounded by events only, 12 runs of a fast upstream of 1 MiB events
# held 242-292 MiB, ~24 MiB each with `resume_max_bytes` 4 MiB).
WRITE_BACKLOG = 1024
WRITE_BACKLOG_BYTES = 1024 * 1024


class RunRegistry:
    """The runs of this process, and the Redis store when there is one (None: memory)."""

    def __init__(
        self,
        settings: Settings,
        store: RedisRunStore | None,
        lifecycle: Lifecycle,
        stop: StreamStop,
        readers: ReaderCaps,
    ) -> None:
        self.settings = settings
        self.store = store
        self.lifecycle = lifecycle
        self.heartbeat = settings.run_heartbeat_seconds
        self.runs: dict[str, Run] = {}
        self.counters = RunCounters()
        self.readers = readers
        self._stop = stop
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        # Ended runs kept here for their window, oldest ended first: run id -> bytes held.
        self._ended: OrderedDict[str, int] = OrderedDict()
        self.ended_bytes = 0
        self.uncounted = UncountedCosts()
        # Near an application's budget, its runs in flight here are published in Redis for as
        # long as a pumper's heartbeat key lives (a dead replica's then count as ended).
        self.budget = BudgetLedger(
            refresh=settings.run_budget_refresh_seconds,
            uncounted=self.uncounted,
            flight_ttl_ms=self.heartbeat_ms,
        )
        stop.subscribe(self._on_shutdown)

    @property
    def heartbeat_ms(self) -> int:
        return max(1, round(self.heartbeat * HEARTBEAT_TTL_BEATS * 1000))

    def ttl_ms(self, app: AppConfig) -> int:
        """How long a run's keys outlive its last heartbeat (or its end)."""
        return round(app.resume_window_seconds * 1000) + self.heartbeat_ms

    @property
    def active(self) -> int:
        return sum(1 for run in self.runs.values() if run.log.end is None)

    def start(
        self,
        run_id: str,
        app: AppConfig,
        owner: str,
        upstream: aiohttp.ClientResponse,
        release: Callable[[], None],
        *,
        reserved: int = 0,
        first: bytes = b"",
    ) -> Run:
        """Register the run (with one local reader: the request that started it) and start
        its pump, which from now on owns `upstream` and `release` (the capacity slots).
        `reserved`: what its budget check counted it as (`app.runs.budget.Admission`);
        `first`: bytes of the upstream's body already taken from it (the pump takes them
        first)."""
        run = Run(
            run_id,
            app,
            owner,
            RunLog(max_events=app.resume_max_events, max_bytes=app.resume_max_bytes),
            local_readers=1,
        )
        self.runs[run_id] = run
        self.counters.started += 1
        # It counts from now on: its keys, and at least what its admission reserved.
        run.uncounted = run.reserved = reserved
        self._note_cost(run)
        # A pump is a request in flight for the drain: a draining replica keeps pumping.
        self.lifecycle.request_started()
        if self.store is not None:
            run.writer = RunWriter(self.store, run, ttl_ms=self.ttl_ms(app))
        run.task = asyncio.create_task(self._pump(run, upstream, release, first))
        return run

    async def start_ended(
        self,
        run_id: str,
        app: AppConfig,
        owner: str,
        body: bytes,
        *,
        reserved: int = 0,
    ) -> bytes | None:
        """A run whose whole answer (`body`, the upstream's complete response body) had
        arrived when it started: created already ended, its events and its end in one Redis
        command (`RedisRunStore.create_ended`), with no pump; returns its events as framed for
        the browser (all of them: what its first response sends). The same run as `start` then
        the pump would make (the same events, ids, end and budget count), one round trip and
        two tasks less. None, with nothing changed, when the pump's way is needed: memory
        store, an event over the run's limits, an unfinished last event, more than one stream
        entry or what the budget allows without asking Redis (`reserved` is the caller's
        again). Raises `StoreUnavailable` when the write failed; `reserved` and the run's cost
        are then settled here: given back at once when Redis refused the write for lack of
        memory (nothing written), else once its keys would have expired (the script may have
        run with its reply lost: attack-19 found that run counted nowhere)."""
        store = self.store
        if store is None:
            return None
        framed = frame_stream(body, max_held=max(app.resume_max_bytes - FRAME_OVERHEAD, 0))
        if framed is None:
            return None
        data, count = framed
        size = len(data)
        if count > app.resume_max_events or size > app.resume_max_bytes or size > ENTRY_BYTES:
            return None  # the log would drop its first events: the pump's way
        app_id = app.app_id
        exact = redis_cost(size, count)  # `run_cost` of a log that kept every event
        cost = max(exact, reserved)
        if cost != reserved:
            self._uncount(app_id, reserved - cost)  # the caller's reservation grows to it
        if self.budget.may_write(app_id) is not True:
            self._uncount(app_id, cost - reserved)
            return None
        window_ms = round(app.resume_window_seconds * 1000)
        try:
            await store.create_ended(
                run_id, RunMeta(owner, app_id), data, count, reason="done", ttl_ms=window_ms
            )
        except StoreFull:
            self._uncount(app_id, cost)  # refused: nothing was written
            raise
        except StoreUnavailable:
            try:
                landed = await self._created(store, run_id)
            except BaseException:  # cancelled while asking (attack-20: counted for ever)
                self._uncount_later(app, cost)
                raise
            if landed is False:
                self._uncount(app_id, cost)
                raise
            if landed is None:
                self._uncount_later(app, cost)
                raise
            # It was created, its reply lost: the run it is (a relay without resume would
            # leave its keys for the window, counted nowhere: attack-19).
        except BaseException:
            self._uncount_later(app, cost)
            raise
        self.counters.started += 1
        self.counters.whole += 1
        self.counters.ended["done"] = self.counters.ended.get("done", 0) + 1
        self.budget.note_ended(app_id, exact)
        self.budget.add(store, app_id, exact, window_ms=window_ms, keep=self.ttl_ms(app) / 1000)
        self._uncount(app_id, cost)  # counted now
        return data

    @staticmethod
    async def _created(store: RedisRunStore, run_id: str) -> bool | None:
        """Whether `run_id`'s meta exists in Redis (None: Redis did not say)."""
        try:
            return await store.meta(run_id) is not None
        except StoreUnavailable:
            return None

    def _uncount_later(self, app: AppConfig, cost: int) -> None:
        """`cost` of `app`'s runs leaves `uncounted` once the keys of a run whose write may
        have landed would have expired."""
        loop = asyncio.get_running_loop()
        loop.call_later(self.ttl_ms(app) / 1000, self._uncount, app.app_id, cost)

    def _on_shutdown(self) -> None:
        for run in self.runs.values():
            run.wake()

    async def _pump(
        self,
        run: Run,
        upstream: aiohttp.ClientResponse,
        release: Callable[[], None],
        first: bytes,
    ) -> None:
        reason = "done"
        try:
            reason = await self._pump_events(run, upstream, first)
        except asyncio.CancelledError:
            reason = "shutting_down"
            raise
        finally:
            try:
                if upstream.content.at_eof() and reason == "done":
                    upstream.release()
                else:
                    upstream.close()  # the upstream learns the run was abandoned
            finally:
                release()
                self.lifecycle.request_finished()
                await self._end(run, reason)

    async def _pump_events(self, run: Run, upstream: aiohttp.ClientResponse, first: bytes) -> str:
        loop = asyncio.get_running_loop()
        content = upstream.content
        # An event must fit the run's log once framed (`resume_max_bytes`).
        parser = SseParser(max_held=max(run.app.resume_max_bytes - FRAME_OVERHEAD, 0))
        idle = run.app.idle_timeout_seconds
        last_data = loop.time()
        next_tick = last_data + self.heartbeat
        writer = run.writer
        while True:
            if writer is not None and writer.failed is not None:
                return "run_store_unavailable"
            if run.stop_requested:
                return "run_stopped"
            if self._stop.is_set:
                return "shutting_down"
            now = loop.time()
            if now >= next_tick:
                ended = await self._tick(run, now)
                if ended is not None:
                    return ended
                next_tick = now + self.heartbeat
                continue
            if first:
                chunk, first = first, b""
            else:
                try:
                    async with asyncio.timeout_at(min(last_data + idle, next_tick)) as waiting:
                        run.waiting = waiting
                        try:
                            chunk = await read_available(content, READ_CHUNK_BYTES)
                        finally:
                            run.waiting = None
                except TimeoutError:
                    if loop.time() >= last_data + idle:
                        return "upstream_idle_timeout"
                    continue
                except (aiohttp.ClientError, OSError, RuntimeError):
                    return "upstream_stream_error"
                if not chunk:
                    return "done"
            last_data = loop.time()
            too_large = False
            try:
                events = parser.feed(chunk)
            except EventTooLarge as err:
                # The events the chunk completed before the one too large are the run's.
                events, too_large = err.events, True
            if events:
                failed = await self._take(run, events)
                if failed is not None:
                    return failed
                writer = run.writer
            if too_large:
                return "upstream_event_too_large"

    async def _take(self, run: Run, events: list[bytes]) -> str | None:
        """`events` into `run`'s log, then to its writer (when its application's budget allows,
        else the run stops keeping them in Redis: `_stop_keeping`; the pump waits while the
        writer's backlog is over its bounds). None, or why the run ends (Redis failed)."""
        appended = run.log.extend(events)
        self._note_cost(run)
        writer = run.writer
        if writer is None:
            return None
        may = self.budget.may_write(run.app.app_id)
        if may is None:
            try:
                may = await self.budget.reserve_growth(writer.store, run.app.app_id)
            except StoreUnavailable as err:
                log.warning("run %s: the run store failed (%s)", run.run_id, err)
                return "run_store_unavailable"
        if not may:
            await self._stop_keeping(run, writer)
            return None
        writer.add(appended, run.log.first_seq, run.log.added_bytes)
        if writer.backlog > WRITE_BACKLOG or writer.backlog_bytes > WRITE_BACKLOG_BYTES:
            await writer.drained()
        return None

    async def _stop_keeping(self, run: Run, writer: RunWriter) -> None:
        """`run`'s growth took its application over its budget (`BudgetLedger.may_write`): its
        events stop going to Redis. What was written stays, then an `event: error`
        `run_over_budget` (without an `id:`, so a browser's Last-Event-ID stays the last event
        it got) and the end, so a resume elsewhere learns it; the run goes on in this process
        for its readers here (a resume here still gets every event). Without this, runs
        started together each counted as the typical run and overran a 16 MiB budget 3.9x
        (attack-11): the budget now bounds what runs write, not only which start."""
        run.writer, run.kept = None, False
        await writer.finish()  # what it had not written stays unwritten
        store, app = writer.store, run.app
        self.counters.cut_over_budget += 1
        log.warning(
            "run %s: its application %s is over resume_redis_budget_bytes; its events stop "
            "going to Redis after %d",
            run.run_id,
            app.app_id,
            writer.written_seq,
        )
        seq = writer.written_seq + 1
        # What it wrote (each write at most a new entry), then the cut's entry.
        cut_bytes = len(error_event(CUT_REASON, run.run_id)) + 2
        cost = redis_cost(writer.written_bytes + cut_bytes, writer.written_events + 1)
        run.cut_pending = (seq, min(run.log.first_seq, seq), cost)
        if await self._record_cut(run, store):
            self._settle_cost(run)
        # else its cost stays uncounted here until the cut is recorded (`_tick`, `_end`).

    async def _record_cut(self, run: Run, store: RedisRunStore) -> bool:
        """Record `run.cut_pending` in Redis: the cut's `event: error` and the end (a reader
        elsewhere followed a cut run whose record failed as a live one, with no end, for as
        long as it pumped here: attack-14), its cost counted. Whether it is recorded now."""
        if run.cut_pending is None:
            return True
        seq, first_kept, cost = run.cut_pending
        window_ms = round(run.app.resume_window_seconds * 1000)
        try:
            await store.end(
                run.run_id,
                [(seq, error_event(CUT_REASON, run.run_id) + b"\n\n")],
                first_kept,
                end_seq=seq + 1,
                reason=CUT_REASON,
                ttl_ms=window_ms,
                largest=run.entry_bucket,
            )
        except StoreUnavailable as err:
            log.warning("run %s: its cut could not be recorded (%s)", run.run_id, err)
            return False
        run.cut_pending = None
        self.budget.add(store, run.app.app_id, cost, window_ms=window_ms, keep=window_ms / 1000)
        run.counted = True
        return True

    def _note_cost(self, run: Run) -> None:
        """Bring `uncounted` of `run`'s application up to what `run` costs Redis now (nothing
        once its events no longer go there)."""
        if not run.kept:
            return
        cost = max(run_cost(run.log, ENTRY_BYTES), run.reserved)
        delta = cost - run.uncounted
        if delta:
            run.uncounted = cost
            self._uncount(run.app.app_id, -delta)

    def _settle_cost(self, run: Run) -> None:
        """At the end: `run`'s cost leaves `uncounted` now if Redis counts it (or there is no
        Redis); else once its keys have expired (their TTL: a window plus a heartbeat TTL),
        so that a run whose count failed still counts here meanwhile."""
        cost, run.uncounted = run.uncounted, 0
        app_id = run.app.app_id
        if run.counted or self.store is None:
            self._uncount(app_id, cost)
        else:
            loop = asyncio.get_running_loop()
            loop.call_later(self.ttl_ms(run.app) / 1000, self._uncount, app_id, cost)

    def _uncount(self, app_id: str, cost: int) -> None:
        """`cost` of `app_id`'s runs here is counted in Redis now (negative: a run grew)."""
        self.uncounted.add(app_id, -cost)
        self.budget.note(app_id)

    async def _tick(self, run: Run, now: float) -> str | None:
        """The heartbeat: stop asked for, nobody reading for the window, or limits: a reason
        to end; else None."""
        window = run.app.resume_window_seconds
        attached = run.local_readers > 0
        remote_present = False
        if self.store is not None:
            if run.cut_pending is not None and await self._record_cut(run, self.store):
                self._settle_cost(run)
            try:
                stop, pttl = await self.store.tick(
                    run.run_id,
                    heartbeat_ms=self.heartbeat_ms,
                    ttl_ms=self.ttl_ms(run.app),
                    keys=run.kept,  # a cut run: its stop flag still read (attack-12)
                )
            except StoreUnavailable as err:
                log.warning("run %s: heartbeat failed (%s)", run.run_id, err)
                return "run_store_unavailable"
            if stop:
                return "run_stopped"
            remote_present = pttl > 0
            if pttl > (window - _PRESENT_BEATS * self.heartbeat) * 1000:
                attached = True
        if attached:
            run.detached_at = None
            run.attached_seq = run.log.next_seq - 1
            return None
        if run.detached_at is None:
            run.detached_at = now
        if now - run.detached_at >= window and not remote_present:
            return "run_expired"
        if run.log.first_seq > run.attached_seq + 1:
            return "run_limit_reached"
        return None

    async def _end(self, run: Run, reason: str) -> None:
        """Record the end: the error event (unless `done`), the end marker, the counters; the
        run stays readable here for its window."""
        counters = self.counters
        counters.ended[reason] = counters.ended.get(reason, 0) + 1
        if reason == "run_expired":
            counters.expired += 1
        if reason != "done":
            log.info("run %s ended: %s (app %s)", run.run_id, reason, run.app.app_id)
        last = [] if reason == "done" else [run.log.append(error_event(reason, run.run_id))]
        run.log.close(reason)
        recorded = False
        try:
            recorded = await self._record_end(run, reason, last)
        finally:
            self._settle_cost(run)
        # Recorded in Redis: resumes read it from there, this process's copy can go now (a
        # busy replica would otherwise hold every answer of the last window). Memory store:
        # the copy here is the run, kept for its window.
        keep = 0.0 if recorded else run.app.resume_window_seconds
        handle = asyncio.get_running_loop().call_later(keep, self._forget, run.run_id)
        self._expiry[run.run_id] = handle
        if keep > 0:
            self._keep_ended(run)

    async def _record_end(self, run: Run, reason: str, last: list[tuple[int, bytes]]) -> bool:
        """Write the run's unwritten events, `last` and its end to Redis and count its bytes
        in its application's budget; whether the end is recorded there."""
        entries: list[tuple[int, bytes]] = []
        if run.writer is not None:
            entries = await run.writer.finish()  # unwritten events go out with the end
            if run.writer.failed is not None:
                reason = "run_store_unavailable"
        entries += last
        recorded = False
        if self.store is not None and not run.kept:
            try:
                await self._record_cut(run, self.store)  # (when its record failed so far)
                await self.store.mark_finished(run.run_id)
            except StoreUnavailable as err:
                log.warning("run %s: its end could not be recorded (%s)", run.run_id, err)
        if self.store is not None and reason != "run_store_unavailable" and run.kept:
            try:
                await self.store.end(
                    run.run_id,
                    entries,
                    run.log.first_seq,
                    end_seq=run.log.next_seq,
                    reason=reason,
                    ttl_ms=round(run.app.resume_window_seconds * 1000),
                    largest=run.entry_bucket,
                )
                recorded = True
                cost = run_cost(run.log, ENTRY_BYTES)
                self.budget.note_ended(run.app.app_id, cost)
                self.budget.add(
                    self.store,
                    run.app.app_id,
                    cost,
                    window_ms=round(run.app.resume_window_seconds * 1000),
                    keep=self.ttl_ms(run.app) / 1000,
                )
                run.counted = True
            except StoreUnavailable as err:
                log.warning("run %s: its end could not be recorded (%s)", run.run_id, err)
        return recorded

    def _keep_ended(self, run: Run) -> None:
        """Count `run` among the ended runs kept here; past `RUN_ENDED_MAX_RUNS` or
        `RUN_ENDED_MAX_BYTES` of them, the oldest ended are forgotten (a resume: 404)."""
        self._ended[run.run_id] = run.log.bytes
        self.ended_bytes += run.log.bytes
        settings = self.settings
        while len(self._ended) > settings.run_ended_max_runs or (
            self.ended_bytes > settings.run_ended_max_bytes and len(self._ended) > 1
        ):
            oldest = next(iter(self._ended))
            handle = self._expiry.get(oldest)
            if handle is not None:
                handle.cancel()
            self.counters.evicted += 1
            self._forget(oldest)

    def _forget(self, run_id: str) -> None:
        self._expiry.pop(run_id, None)
        self.runs.pop(run_id, None)
        held = self._ended.pop(run_id, None)
        if held is not None:
            self.ended_bytes -= held

    def stop_local(self, run: Run) -> None:
        run.stop_requested = True
        run.wake()

    async def close(self) -> None:
        """Cleanup: the pumps were told to stop by the shutdown; wait briefly, then cancel."""
        self._stop.unsubscribe(self._on_shutdown)
        tasks = [run.task for run in self.runs.values() if run.task and not run.task.done()]
        for run in self.runs.values():
            run.wake()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_CLOSE_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        followers = [f for slots in self.readers.apps.values() for f in slots.followers.values()]
        await asyncio.gather(*(follower.close() for follower in followers))
        await self.budget.close()


@contextlib.contextmanager
def reading(run: Run) -> Iterator[None]:
    """A local reader of `run` while inside (the pump's presence check)."""
    run.local_readers += 1
    try:
        yield
    finally:
        run.local_readers -= 1
