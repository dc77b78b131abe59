"""The upstream call: one async context manager, `UpstreamCall`, that sends the request and
yields an answer the proxy may relay, or raises the error it is answered with.

    async with UpstreamCall(exchange, url, data, conversation_id) as answer:
        ...  # relay `answer`, or `call.hand_over()` it to a run

Raised on entry (each logged and counted in `upstream_errors` where the upstream is at fault):
- the browser's body: over the cap, 413 (`BodyTooLarge`); paused or late, 408 (`BodyTimeout`);
- no response headers within `connect_timeout_seconds`: 504 `UpstreamTimeout` (the timer is
  paused while the gateway waits for the browser's body, app/proxy/exchange.py);
- refused, reset, unreachable: 502 `UpstreamUnavailable`;
- not valid HTTP (status line, framing, header limits, a control character in the reason or a
  header), or a status outside 200-599 (`101` would make the proxy in front a raw tunnel to
  this server): 502 `UpstreamProtocolError`;
- a redirect to another path of this gateway than the application's: 502
  `UpstreamRedirectNotAllowed` (app/proxy/urls.py).

On exit the answer's connection goes back to the pool when its body was read to the end and
the browser is still there; otherwise it is closed, which is how the upstream learns the
request was abandoned. After `hand_over()` (to a run) and until `take_back()`, the exit
leaves it alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from types import TracebackType

import aiohttp
from yarl import URL

from app.keys import UPSTREAM_KEY
from app.proxy.errors import (
    UpstreamProtocolError,
    UpstreamRedirectNotAllowed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.proxy.exchange import Exchange
from app.proxy.headers import has_invalid_header, upstream_request_headers
from app.proxy.urls import redirect_leaves_application
from app.request_metrics import record_upstream_error, record_upstream_first_byte
from app.upstream import request_timeout

log = logging.getLogger(__name__)

# The only statuses relayed: final ones. aiohttp's client consumes the other 1xx itself.
RELAYED_STATUSES = (200, 599)


class UpstreamCall:
    """`request` of the exchange sent to `url` (see the module docstring)."""

    __slots__ = ("_answer", "_conversation_id", "_data", "_exchange", "_url", "handed_over")

    def __init__(
        self,
        exchange: Exchange,
        url: URL,
        data: bytes | AsyncIterator[bytes] | None,
        conversation_id: str,
    ) -> None:
        self._exchange = exchange
        self._url = url
        self._data = data
        self._conversation_id = conversation_id
        self._answer: aiohttp.ClientResponse | None = None
        self.handed_over = False

    def hand_over(self) -> None:
        """Someone else (a run) owns the answer from now on: the exit leaves it alone."""
        self.handed_over = True

    def take_back(self) -> None:
        """The answer is this call's again (the run did not start): the exit releases it."""
        self.handed_over = False

    async def __aenter__(self) -> aiohttp.ClientResponse:
        answer = await self._send()
        self._answer = answer
        try:
            self._check(answer)
        except BaseException:
            answer.close()
            self._answer = None
            raise
        return answer

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        answer = self._answer
        if answer is None or self.handed_over:
            return
        if answer.content.at_eof() and not self._exchange.client_gone:
            answer.release()
        else:
            answer.close()

    async def _send(self) -> aiohttp.ClientResponse:
        exchange = self._exchange
        request, app = exchange.request, exchange.app
        timeout = app.connect_timeout_seconds
        sent = time.perf_counter()  # metrics: time to first byte
        try:
            async with asyncio.timeout(timeout) as deadline:
                exchange.header_deadline = deadline  # paused while the browser uploads
                try:
                    answer = await request.app[UPSTREAM_KEY].session.request(
                        request.method,
                        self._url,
                        headers=upstream_request_headers(
                            request, app, exchange.settings, self._conversation_id
                        ),
                        data=self._data,
                        allow_redirects=False,
                        timeout=request_timeout(timeout),
                    )
                finally:
                    exchange.header_deadline = None
                    # Sent (or failed): the browser's body is not held for the answer's life.
                    self._data = None
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            if exchange.upload_error is not None:
                raise exchange.upload_error from None  # the browser's doing, not the upstream's
            if isinstance(err, TimeoutError):
                log.warning(
                    "upstream timeout: no response headers within %ss (app %s, request %s)",
                    timeout,
                    app.app_id,
                    exchange.request_id,
                )
                record_upstream_error(request, "timeout")
                raise UpstreamTimeout() from None
            if isinstance(err, aiohttp.ClientResponseError):
                # An answer that is not valid HTTP (status line, framing, header limits): the
                # upstream is broken, not unreachable.
                raise self._protocol_error(type(err).__name__) from None
            log.warning(
                "upstream unavailable: %s (app %s, request %s)",
                type(err).__name__,
                app.app_id,
                exchange.request_id,
            )
            record_upstream_error(request, "unavailable")
            raise UpstreamUnavailable() from None
        record_upstream_first_byte(request, sent)
        return answer

    def _check(self, answer: aiohttp.ClientResponse) -> None:
        """Raise unless `answer` may be relayed (a valid head, a final status, a redirect that
        stays within the application)."""
        exchange = self._exchange
        if has_invalid_header(answer):
            raise self._protocol_error("control character in a response header")
        status = answer.status
        if not RELAYED_STATUSES[0] <= status <= RELAYED_STATUSES[1]:
            raise self._protocol_error(f"status {status}")
        if (
            300 <= status < 400
            and status != 304
            and redirect_leaves_application(
                answer.headers.getall("Location", []),
                exchange.request,
                exchange.app,
                exchange.settings,
            )
        ):
            log.warning(
                "upstream redirect outside its application refused (app %s, request %s)",
                exchange.app.app_id,
                exchange.request_id,
            )
            record_upstream_error(exchange.request, "protocol_error")
            raise UpstreamRedirectNotAllowed()

    def _protocol_error(self, detail: str) -> UpstreamProtocolError:
        exchange = self._exchange
        log.warning(
            "upstream protocol error: %s (app %s, request %s)",
            detail,
            exchange.app.app_id,
            exchange.request_id,
        )
        record_upstream_error(exchange.request, "protocol_error")
        return UpstreamProtocolError(detail)
