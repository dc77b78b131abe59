"""One virtual user (a browser: its own cookie jar and connection, one request at a time) and
the request cap all users share; its session continuity checks are described in runner.py."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from typing import Any

import aiohttp

from app.loadkit.recording import MIX_KINDS, LoadConfig, Recorder, classify
from app.loadkit.streams import RunRead, StreamRead, error_code


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
                    if resp.status == 409 and error_code(raw) == "session_ended":
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
