"""Graceful shutdown: in-flight requests, open streams and idle keep-alive connections.

On SIGTERM `python -m app` (see `app/__main__.py`) does, in order:

1. `begin_shutdown()`: `/readyz` answers 503 and every response from now on carries
   `Connection: close`, so a load balancer retires each keep-alive connection after the one
   request it still sends on it instead of reusing it.
2. Closes the listener at once: new connections are refused. A refused connection never
   carried a request, so a load balancer may retry it on another replica whatever the method
   (nginx does, with `proxy_next_upstream error`, even for POST and PATCH).
3. `drain(open_connections)`: waits until no request is in flight and no client connection is
   left open, for at most `SHUTDOWN_TIMEOUT_SECONDS`. Idle keep-alive connections are *not*
   closed right away: closing one races a load balancer that is sending a request on it (that
   request is lost, and a non-idempotent one cannot be retried safely). They stay open for up
   to `SHUTDOWN_IDLE_GRACE_SECONDS`; in that window the balancer either uses them (one last
   request, answered with `Connection: close`) or closes them itself after its own upstream
   keep-alive timeout (keep it below the grace; `deploy/nginx.conf` uses 4 s).
   When the timeout passes with streams still open, `stop_streams` is set and they end with
   `event: error` `shutting_down`.
4. aiohttp closes what is left, then the cleanup contexts close the upstream client and Redis
   last; the process exits 0.

Applications run without `python -m app` (tests) still drain through `drain_on_shutdown`, an
`on_shutdown` hook, which is a no-op when the drain already happened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from app.keys import LIFECYCLE_KEY

log = logging.getLogger(__name__)

# How often the drain re-checks the connection count (connections have no close event).
_POLL_SECONDS = 0.05


@dataclass(slots=True)
class Lifecycle:
    """Process-wide state for shutdown; one per application."""

    shutdown_timeout: float
    # Longest time idle keep-alive connections stay open after SIGTERM (bounded by the timeout).
    idle_grace: float = 5.0
    shutting_down: bool = False
    in_flight: int = 0
    # Set when open streams must stop now and send their final `shutting_down` event.
    stop_streams: asyncio.Event = field(default_factory=asyncio.Event)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _drained: bool = False

    def __post_init__(self) -> None:
        self._idle.set()

    def request_started(self) -> None:
        """A request is in flight until the matching `request_finished()` (call it in a
        `finally`). Plain calls: the gateway middleware does this on every request, where an
        async context manager costs a generator and two coroutine steps."""
        self.in_flight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def begin_shutdown(self) -> None:
        """Not ready any more; responses from now on close their connection."""
        if not self.shutting_down:
            self.shutting_down = True
            log.info("shutting down: %d request(s) in flight", self.in_flight)

    async def drain(self, open_connections: Callable[[], int] | None = None) -> None:
        """Wait for in-flight requests (and, with `open_connections`, for clients to close
        their connections, up to `idle_grace`), at most `shutdown_timeout` in all; then tell
        streams still open to stop. Runs once; later calls return at once."""
        if self._drained:
            return
        self._drained = True
        self.begin_shutdown()
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.shutdown_timeout
        grace_end = started + min(self.idle_grace, self.shutdown_timeout)
        try:
            async with asyncio.timeout_at(deadline):
                await self._idle.wait()
                if open_connections is not None:
                    while open_connections() > 0 and loop.time() < grace_end:
                        await asyncio.sleep(_POLL_SECONDS)
                        # A last request on a kept-alive connection may be running.
                        await self._idle.wait()
        except TimeoutError:
            log.warning("shutdown timeout: ending %d request(s) still in flight", self.in_flight)
        if open_connections is not None and (left := open_connections()) > 0:
            log.info("closing %d idle connection(s)", left)
        self.stop_streams.set()


async def drain_on_shutdown(app: web.Application) -> None:
    await app[LIFECYCLE_KEY].drain()


async def close_connections_when_draining(
    request: web.Request, response: web.StreamResponse
) -> None:
    """`on_response_prepare`: after SIGTERM, every response ends its connection."""
    if request.app[LIFECYCLE_KEY].shutting_down:
        response.force_close()
        response.headers["Connection"] = "close"
