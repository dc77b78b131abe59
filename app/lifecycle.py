"""Graceful shutdown: in-flight requests and open streams, tracked so SIGTERM can drain them.

aiohttp's order on SIGTERM is: stop listening -> `on_shutdown` -> wait for handlers ->
`on_cleanup`. `drain_on_shutdown` (an `on_shutdown` hook) marks the process as shutting down
(`/readyz` answers 503), waits up to `SHUTDOWN_TIMEOUT_SECONDS` for in-flight requests and
streams to finish, then tells streams still open to end with `event: error` `shutting_down`.
Redis and the upstream client close after that, in their cleanup contexts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Lifecycle:
    """Process-wide state for shutdown; one per application."""

    shutdown_timeout: float
    shutting_down: bool = False
    in_flight: int = 0
    # Set when open streams must stop now and send their final `shutting_down` event.
    stop_streams: asyncio.Event = field(default_factory=asyncio.Event)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    @contextlib.asynccontextmanager
    async def track(self) -> AsyncIterator[None]:
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def drain(self) -> None:
        self.shutting_down = True
        log.info("shutting down: %d request(s) in flight", self.in_flight)
        try:
            async with asyncio.timeout(self.shutdown_timeout):
                await self._idle.wait()
        except TimeoutError:
            log.warning("shutdown timeout: ending %d request(s) still in flight", self.in_flight)
        self.stop_streams.set()


LIFECYCLE_KEY = web.AppKey("lifecycle", Lifecycle)


async def drain_on_shutdown(app: web.Application) -> None:
    await app[LIFECYCLE_KEY].drain()
