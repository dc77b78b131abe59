"""One agent request in flight (`Exchange`): the state the handler, its relay and the
disconnect watch share, and the browser's body as it is sent upstream (the upload timers:
`BODY_TIMEOUT_SECONDS` per pause, `upload_deadline` in all, the upstream's header timer paused
while the gateway waits for the browser).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from aiohttp import web

from app.applications import AppConfig
from app.capacity import AppSlots
from app.config import Settings
from app.errors import BodyTimeout, BodyTooLarge
from app.keys import REQUEST_ID_KEY
from app.lifecycle import Lifecycle

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Exchange:
    """State shared by the handler, its relay task and the disconnect watcher."""

    request: web.Request
    app: AppConfig
    settings: Settings
    lifecycle: Lifecycle
    response: web.StreamResponse | None = None
    # Set by `lose_client` only: the browser is gone.
    client_gone: bool = False
    # Why the browser's body was cut (413 `BodyTooLarge`, 408 `BodyTimeout`), raised from
    # `body` inside the upstream client, which wraps it: the upstream call raises this instead.
    upload_error: BodyTooLarge | BodyTimeout | None = None
    # The timer of the upstream's response headers while it runs (see `body`).
    header_deadline: asyncio.Timeout | None = None
    # Upstream capacity (app/capacity.py): what this request holds, returned by
    # `_proxy_holding_slots`; the loop time by which a streamed upload must be complete.
    slots: AppSlots | None = None
    client_key: str | None = None
    session_key: str | None = None
    upload_deadline: float = math.inf
    # Bytes of the upstream's body already taken from it (app/runs/start.py `start_run`, when
    # no run could start): the relay sends them first.
    taken: bytes = b""

    @property
    def request_id(self) -> str:
        return self.request[REQUEST_ID_KEY]

    def lose_client(self) -> None:
        """The browser is gone: its connection failed under a write (app/proxy/relay.py) or
        closed, or it read nothing for too long (app/proxy/watch.py). The upstream answer is
        then closed, not pooled, and a cancelled exchange ends as 499."""
        self.client_gone = True

    def arrived_body(self, cap: int) -> bytes | None:
        """The browser's whole body when all of it has already arrived (typical of a small
        one: it comes with the request head), else None (read it with `body`). Over `cap`
        bytes: `BodyTooLarge`, as from `body`."""
        content = self.request.content
        if not content.is_eof():
            return None
        data = content.read_nowait(-1)
        if len(data) > cap:
            raise self._cut(BodyTooLarge())
        return data

    async def body(self, cap: int) -> AsyncGenerator[bytes, None]:
        """The browser's body, streamed upstream: cut at `cap` (413 `body_too_large`), at
        a pause over `BODY_TIMEOUT_SECONDS` and at `upload_deadline` (408 `body_timeout`).

        While it waits for the browser, the upstream's header timer (`connect_timeout`) is
        paused: a slow upload is the browser's doing, never a 504. Each chunk handed over (and
        the end of the body) restarts it in full, so it runs while the upstream reads (or
        does not) and after the whole body was sent.
        """
        loop = asyncio.get_running_loop()
        chunks = self.request.content.iter_any()
        received = 0
        pause = self.settings.body_timeout_seconds
        while True:
            self._set_header_deadline(None)
            try:
                async with asyncio.timeout_at(min(loop.time() + pause, self.upload_deadline)):
                    chunk = await anext(chunks, b"")
            except TimeoutError:
                log.info(
                    "browser body paused for %ss or not complete by its upload deadline "
                    "(app %s, request %s)",
                    pause,
                    self.app.app_id,
                    self.request_id,
                )
                raise self._cut(BodyTimeout()) from None
            finally:
                self._set_header_deadline(loop.time() + self.app.connect_timeout_seconds)
            if not chunk:
                return
            received += len(chunk)
            if received > cap:
                raise self._cut(BodyTooLarge())
            yield chunk

    def _cut(self, error: BodyTooLarge | BodyTimeout) -> BodyTooLarge | BodyTimeout:
        self.upload_error = error
        return error

    def _set_header_deadline(self, when: float | None) -> None:
        deadline = self.header_deadline
        # Once the headers arrived (or the timer fired) the upload may go on: leave it be.
        if deadline is not None and not deadline.expired():
            deadline.reschedule(when)
