"""The access log: one line per request (fields: app/logs.py), and its fenced fast path.

Fast path: when the only handler an access record would reach is the `GatewayHandler` that
`configure_logging` installed (no filter, no other handler: tests' `caplog` and any other setup
get the ordinary `logger.info` path) and its `fast_access` is on, `AccessLogger` renders the
line itself, exactly as `TextFormatter`/`JsonFormatter` would (the timestamp prefix formatted
once per second, the session hash once per session), with no `LogRecord`, no `Logger.handle`
and no `Formatter` round trip, and hands it to `GatewayHandler.write_line`, which writes the
lines of one event-loop iteration together.

Measured gain (why it exists): one access line (`AccessLogger.log`, `timeit`, best of 5,
2026-12-03, shared 2-core VM), text 10.2 us here against 35.9 us through `logger.info` and
`TextFormatter`, JSON 8.3 against 23.0 us. Gateway CPU per request in two bench runs (the
`_public` rows run `FAST_PATHS=off`, which also switches app/fast_metrics.py): memory-store
read 67 and 76 us against 116 and 96 us, Redis read 86 and 92 against 137 and 119 us:

    .venv/bin/python scripts/bench.py --rows \
        gw_mem_read,gw_mem_read_public,gw_redis_read,gw_redis_read_public --reps 3 --seconds 5

Fence: `enable_fast_path(handler, wanted)` runs `self_check()` at start-up (`python -m app`):
sample lines (hostile text included) rendered both ways must be equal but for the time of day;
when they are not, or with `FAST_PATHS=off`, every access line goes through `logging`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from app.config import IPNetwork
from app.forwarding import client_ip
from app.keys import APP_ID_KEY, REQUEST_ID_KEY, REQUEST_STARTED_KEY, SESSION_KEY, SETTINGS_KEY
from app.logs import (
    GatewayHandler,
    JsonFormatter,
    TextFormatter,
    escape_control,
    iso_time,
    json_line,
    session_hash,
    text_time,
)

_log = logging.getLogger(__name__)
_perf_counter = time.perf_counter  # a module global: tests pin it to compare lines


@dataclass(slots=True, eq=False)
class _AccessLine:
    """The fields of one access line and its three renderings: the message (text lines and the
    JSON `msg`), the JSON fields, and the whole line as the formatters would write it."""

    request_id: str | None
    app_id: str | None
    method: str
    path: str
    raw_path: str
    status: int
    duration: float
    hashed: str
    client: str
    sent: int
    user_agent: str

    def message(self) -> str:
        """Space-separated fields, so the path is the one the browser sent, percent-encoded (a
        decoded `%20` would make a request's own text look like fields); the user agent comes
        last: it has spaces, so it runs to the end of the line."""
        millis = "%.3f" % (self.duration * 1000)  # %-format: cheaper than an f-string spec
        return (
            f"{self.method} {self.raw_path} {self.status} {millis}ms "
            f"request_id={self.request_id or '-'} "
            f"app={self.app_id or '-'} session={self.hashed or '-'} "
            f"client={self.client or '-'} bytes_sent={self.sent} ua={self.user_agent or '-'}"
        )

    def fields(self) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "application": self.app_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "duration_ms": round(self.duration * 1000, 3),
            "session": self.hashed,
            "client": self.client,
            "bytes_sent": self.sent,
            "user_agent": self.user_agent,
        }

    def text(self, logger_name: str) -> str:
        """What `TextFormatter` writes for `message()`."""
        return f"{text_time(time.time())} INFO {logger_name}: {escape_control(self.message())}\n"

    def json(self, logger_name: str) -> str:
        """What `JsonFormatter` writes for `message()` and `fields()`."""
        # `json.dumps` of a str is this function (its C part) behind two layers of Python.
        dumps = encode_basestring_ascii
        ts = iso_time(time.time())
        msg = self.message()
        request_id = "null" if self.request_id is None else dumps(self.request_id)
        app_id = "null" if self.app_id is None else dumps(self.app_id)
        line = (
            f'{{"ts": "{ts}", "level": "info", "logger": {dumps(logger_name)}, '
            f'"msg": {dumps(msg)}, "request_id": {request_id}, '
            f'"application": {app_id}, "method": {dumps(self.method)}, '
            f'"path": {dumps(self.path)}, "status": {self.status}, '
            f'"duration_ms": {round(self.duration * 1000, 3)!r}, "session": "{self.hashed}", '
            f'"client": {dumps(self.client)}, "bytes_sent": {self.sent}, '
            f'"user_agent": {dumps(self.user_agent)}}}\n'
        )
        # Every text field is in `msg`: ASCII there (O(1) to know) means no surrogate anywhere.
        if not msg.isascii() and "\\ud" in line:  # maybe a lone surrogate: `json_line` decides
            fields = {"ts": ts, "level": "info", "logger": logger_name, "msg": msg}
            line = json_line(fields | self.fields()) + "\n"
        return line


class AccessLogger(AbstractAccessLogger):
    """One line per request, without query strings (they may carry tokens)."""

    # `TRUSTED_PROXIES` of the app served, read from the first request that reaches it (a
    # request aiohttp refused before routing has no app); `client_ip` needs it.
    _trusted: tuple[IPNetwork, ...] | None = None

    def log(self, request: web.BaseRequest, response: web.StreamResponse, duration: float) -> None:
        # `request.get` is `Mapping.get` (Python code around `__getitem__`); the gateway
        # middleware sets the session and request id on every request it sees, so look them up
        # directly and fall back only for requests that never reached it.
        try:
            session = request[SESSION_KEY]
            request_id: str | None = request[REQUEST_ID_KEY]
            # Sub-millisecond: aiohttp's `duration` is `loop.time()`, whole ms under uvloop.
            duration = _perf_counter() - request[REQUEST_STARTED_KEY]
        except KeyError:
            session = request.get(SESSION_KEY)
            request_id = request.get(REQUEST_ID_KEY)
        identity = session.identity if session is not None else None
        hashed = session_hash(identity) if isinstance(identity, str) else ""
        trusted = self._trusted
        if trusted is None:
            trusted = self._trusted_proxies(request)
        line = _AccessLine(
            request_id,
            request.get(APP_ID_KEY),
            request.method,
            request.rel_url.path,
            request.rel_url.raw_path,
            response.status,
            duration,
            hashed,
            client_ip(request, trusted),
            response.body_length,
            request.headers.get("User-Agent", ""),
        )
        handler = _sole_handler(self.logger)
        if handler is not None:
            name = self.logger.name
            handler.write_line(line.json(name) if handler.json_lines else line.text(name))
            return
        self.logger.info(line.message(), extra={"fields": line.fields()})

    def _trusted_proxies(self, request: web.BaseRequest) -> tuple[IPNetwork, ...]:
        if not isinstance(request, web.Request):
            return ()
        try:
            app = request.app
        except (AssertionError, AttributeError):  # refused before routing: no app (yet)
            return ()
        settings = app.get(SETTINGS_KEY)
        if settings is None:  # not the gateway's app (a test's)
            return ()
        self._trusted = settings.trusted_proxies
        return settings.trusted_proxies

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def _sole_handler(logger: logging.Logger) -> GatewayHandler | None:
    """Our handler, when its fast path is on and it is the only place an INFO record of
    `logger` would go and nothing (a filter, a level) would change or drop it; else None."""
    found: GatewayHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if found is not None or not isinstance(handler, GatewayHandler):
                return None
            if handler.filters or handler.level > logging.INFO or not handler.fast_access:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    return found


# Sample fields for `self_check`: plain, hostile (controls, DEL, C1, U+2028, a lone surrogate
# as aiohttp makes one from an undecodable header byte, a backslash, quotes) and missing.
_SAMPLES = (
    (
        "rid-1",
        "demo",
        "GET",
        "/apps/demo/session",
        "/apps/demo/session",
        200,
        0.00042,
        "ab12",
        "10.0.0.1",
        120,
        "curl/8",
    ),
    (
        "r\u2028",
        None,
        "POST",
        '/apps/demo/\n2026 INFO forged\x1b[31m\x7f\x85\u2028\\"',
        "/apps/demo/%0a2026%20INFO%20forged%1b[31m%7f%c2%85%e2%80%a8%5c%22",
        502,
        61.0,
        "",
        "",
        0,
        'ua\udcff\u2028 "q" \\ \U0001f600 \u202e',
    ),
    (None, None, "GET", "/", "/", 400, 0.0, "", "", 0, ""),
)
# The time of day at the start of a text line (`%(asctime)s`: `2026-12-03 18:20:52,123`).
_TEXT_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def self_check() -> str | None:
    """None when `_AccessLine` renders each sample exactly as `TextFormatter` and
    `JsonFormatter` format the record `logger.info` would make (the time of day aside);
    otherwise which rendering differs."""
    name = "aiohttp.access"
    try:
        for fields in _SAMPLES:
            line = _AccessLine(*fields)
            record = logging.makeLogRecord(
                {
                    "name": name,
                    "levelno": logging.INFO,
                    "levelname": "INFO",
                    "msg": line.message(),
                    "fields": line.fields(),
                }
            )
            text = TextFormatter().format(record) + "\n"
            if _TEXT_TIME.sub("", line.text(name)) != _TEXT_TIME.sub("", text):
                return f"text line differs: {line.text(name)!r} != {text!r}"
            fast, slow = json.loads(line.json(name)), json.loads(JsonFormatter().format(record))
            fast.pop("ts"), slow.pop("ts")
            if list(fast.items()) != list(slow.items()):
                return f"JSON line differs: {fast!r} != {slow!r}"
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def enable_fast_path(handler: GatewayHandler, wanted: bool) -> bool:
    """Turn `handler`'s fast path on when `wanted` (`FAST_PATHS=auto`) and `self_check()`
    passes (a failure is logged); returns whether it is on."""
    problem = self_check() if wanted else None
    if problem is not None:
        _log.warning("access log: every line through logging, not the fast path: %s", problem)
    handler.fast_access = wanted and problem is None
    return handler.fast_access
