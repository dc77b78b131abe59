"""Logging setup: plain text or JSON lines (`LOG_FORMAT=json`); one access line per request.

Access lines carry the request id, application id, method, path (never the query string),
status, duration (from the gateway middleware's start, `perf_counter`: sub-millisecond),
`session` (a salted hash of the session id, `sha256(salt || id)` cut to 16 hex characters, so
the lines of one session can be correlated without the log revealing the id, a cookie or a
token), the client address (`TRUSTED_PROXIES`-aware, app/forwarding.py), the bytes sent (headers
included) and the user agent. The salt is `LOG_SALT` (set the same value on every replica to
correlate across them) or, by default, random per process.

JSON lines: `ts` is ISO 8601 in UTC with milliseconds (`2026-12-03T18:20:52.123Z`); every line
written while the gateway middleware handles a request (by that task or a task it started)
carries `request_id` and `application` (the configured application id, or null) as fields,
from a context variable (`bind_request`), not as text in `msg`.

Hostile text (log injection): the access line's message shows the path as the browser sent it
(percent-encoded: a decoded `%20` could make text of the request look like the line's fields;
the JSON `path` field is the decoded path), and a text line's message is passed through
`escape_control`, so
characters that are not printable (C0 and C1 controls, DEL, U+2028/U+2029, lone surrogates,
bidi and other format characters) and the backslash itself are written as `\\xNN`, `\\uNNNN`,
`\\UNNNNNNNN` or `\\\\`: a percent-decoded `%0a` in a path, a header value or an upstream's error
text can neither start a forged line nor reach a terminal as an escape sequence. Lines of a
traceback are escaped the same way and indented by two spaces, so only a record starts in column
0. JSON lines need no such step: `json.dumps` escapes every control and non-ASCII character.

Cost: the access line is on every request's path, so when the only handler that would see it is
the one `configure_logging` installed, `AccessLogger` formats the line itself (same text and
JSON layout as the formatters, no `LogRecord`/`Formatter` round trip, the timestamp prefix
formatted once per second, the session hash computed once per session) and writes it to that
handler's stream at the end of the event-loop iteration, together with the other access lines of
that iteration (one write and flush per iteration, not per request). Any other logging setup
(tests' `caplog`, extra handlers, filters) gets the ordinary `logger.info` path.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from json.encoder import encode_basestring_ascii

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from app.config import IPNetwork
from app.forwarding import client_ip
from app.keys import APP_ID_KEY, REQUEST_ID_KEY, REQUEST_STARTED_KEY, SESSION_KEY, SETTINGS_KEY

_salt: bytes = secrets.token_bytes(32)
# session id -> its hash under the current salt; cleared with the salt and when it grows past
# `_HASH_CACHE_MAX` (a flood of one-shot ids cannot grow it without bound).
_hash_cache: dict[str, str] = {}
_HASH_CACHE_MAX = 65_536
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def set_log_salt(salt: str | None) -> None:
    """Use `salt` for session hashes; empty or None means a fresh random one (per process)."""
    global _salt
    _salt = salt.encode("utf-8") if salt else secrets.token_bytes(32)
    _hash_cache.clear()


def session_hash(session_id: str) -> str:
    """`sha256(salt || session_id)`, first 16 hex characters: correlates, never reveals."""
    cached = _hash_cache.get(session_id)
    if cached is None:
        cached = hashlib.sha256(_salt + session_id.encode("utf-8")).hexdigest()[:16]
        if len(_hash_cache) >= _HASH_CACHE_MAX:
            _hash_cache.clear()
        _hash_cache[session_id] = cached
    return cached


def escape_control(text: str) -> str:
    """`text` with every character that is not printable (`str.isprintable`: controls, line
    and paragraph separators, surrogates, format characters) and every backslash written as a
    Python-style escape (`\\x0a`, `\\u2028`, `\\\\`); `text` itself when there is none."""
    if text.isascii():
        # The usual case, twice as fast as `isprintable`: drop the bytes that need escaping
        # and see whether anything went.
        if len(text.encode("ascii").translate(None, _ASCII_ESCAPED)) == len(text):
            return text
    elif text.isprintable() and "\\" not in text:
        return text
    return "".join(map(_escape_char, text))


# The ASCII characters `escape_control` escapes: C0 controls, DEL, the backslash.
_ASCII_ESCAPED = bytes([*range(0x20), 0x7F, 0x5C])


def _escape_char(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if char.isprintable():
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _continuation(block: str) -> str:
    """A traceback or stack block as continuation lines: each escaped and indented."""
    return "".join(f"\n  {escape_control(line)}" for line in block.split("\n"))


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT` lines whose message is `escape_control`led and whose traceback lines are
    escaped and indented (see the module docstring): one record, one line starting in column 0."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += _continuation(record.exc_text)
        if record.stack_info:
            line += _continuation(self.formatStack(record.stack_info))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: `ts` (ISO 8601, UTC, milliseconds), `level`, `logger`,
    `msg`; inside a request (`bind_request`) also `request_id` and `application` (the
    configured application id, or null); then the record's `fields` (access lines) and `exc`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        bound = _BOUND.get()
        if bound is not None and (request := bound[0]) is not None:
            line["request_id"] = request.get(REQUEST_ID_KEY)
            line["application"] = request.get(APP_ID_KEY)
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            line.update(extra)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json_line(line)


# The request the current task works for, in a one-item list the gateway middleware empties
# when the request is done: a task that copied this context (a batch sender, a sweeper started
# by the first request) and logs later does not speak for a finished request.
_BOUND: ContextVar[list[web.Request | None] | None] = ContextVar("agent_bff_request", default=None)
_perf_counter = time.perf_counter  # a module global: tests pin it to compare lines


def bind_request(request: web.Request, started: float) -> Token[list[web.Request | None] | None]:
    """Called by the gateway middleware when it starts on `request` (at `started`,
    `perf_counter`): until `release_request`, JSON lines logged by this task and the tasks it
    starts carry the request's `request_id` and `application`."""
    request[REQUEST_STARTED_KEY] = started
    return _BOUND.set([request])


def release_request(token: Token[list[web.Request | None] | None]) -> None:
    bound = _BOUND.get()
    if bound is not None:
        bound[0] = None
    _BOUND.reset(token)


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_line(line: dict[str, object]) -> str:
    """`line` as one JSON object (`json.dumps`: controls and non-ASCII escaped, so a value can
    never end the line). A lone surrogate (aiohttp decodes a header's undecodable bytes with
    `surrogateescape`) would become a `\\udcff` escape that strict JSON parsers refuse, so in
    that case every surrogate is written as that text instead, as in text lines."""
    text = json.dumps(line, default=str)
    if "\\ud" in text:  # maybe a lone surrogate (or a valid pair): check the values
        text = json.dumps(_without_surrogates(line), default=lambda o: _without_surrogates(str(o)))
    return text


def _without_surrogates(value: object) -> object:
    if isinstance(value, str):
        return value if value.isascii() else _SURROGATE.sub(_escape_match, value)
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_surrogates(v) for v in value]
    return value


def _escape_match(match: re.Match[str]) -> str:
    return _escape_char(match.group())


class _GatewayHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure_logging` installs; `json` says which layout it writes."""

    def __init__(self, json_lines: bool) -> None:
        super().__init__(sys.stderr)
        self.json_lines = json_lines


def configure_logging(level: str, fmt: str, *, salt: str | None = None) -> None:
    set_log_salt(salt)
    handler = _GatewayHandler(fmt == "json")
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _sole_handler(logger: logging.Logger) -> _GatewayHandler | None:
    """Our handler, when it is the only place an INFO record of `logger` would go and nothing
    (a filter, a level) would change or drop it; otherwise None."""
    found: _GatewayHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if found is not None or not isinstance(handler, _GatewayHandler):
                return None
            if handler.filters or handler.level > logging.INFO:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    return found


class _Clock:
    """A timestamp with the per-second part formatted once: `asctime` (text lines: local time,
    `,mmm`, what `%(asctime)s` writes) or `iso` (JSON lines: ISO 8601 in UTC, `.mmmZ`)."""

    def __init__(
        self, pattern: str, convert: Callable[[float], time.struct_time], millis: tuple[str, ...]
    ) -> None:
        self._pattern = pattern
        self._convert = convert
        self._millis = millis
        self._second = -1
        self._prefix = ""

    def __call__(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime(self._pattern, self._convert(second))
        return self._prefix + self._millis[min(int((now - second) * 1000), 999)]


# ",000" ... ",999" and ".000Z" ... ".999Z": the millisecond parts without formatting a number
# per line.
_asctime = _Clock("%Y-%m-%d %H:%M:%S", time.localtime, tuple(f",{ms:03d}" for ms in range(1000)))
iso_time = _Clock("%Y-%m-%dT%H:%M:%S", time.gmtime, tuple(f".{ms:03d}Z" for ms in range(1000)))
"""`iso_time(time.time())` -> e.g. `2026-12-03T18:20:52.123Z` (the `ts` of JSON lines)."""

# Access lines of one event-loop iteration, written together at its end (one write and flush
# instead of one per request); `_flush` also runs at exit.
_pending: list[str] = []
_pending_handler: _GatewayHandler | None = None


def _queue(handler: _GatewayHandler, line: str) -> None:
    global _pending_handler
    if _pending_handler is not handler:
        _flush()
        _pending_handler = handler
    _pending.append(line)
    if len(_pending) == 1:
        try:
            asyncio.get_running_loop().call_soon(_flush)
        except RuntimeError:  # no event loop: write now
            _flush()


def _flush() -> None:
    handler = _pending_handler
    if not _pending or handler is None:
        return
    text = "".join(_pending)
    _pending.clear()
    stream = handler.stream
    handler.acquire()
    try:
        stream.write(text)
        stream.flush()
    except Exception:  # as StreamHandler.emit: a broken stderr must not fail the request
        handler.handleError(logging.makeLogRecord({"msg": text}))
    finally:
        handler.release()


atexit.register(_flush)


class _AccessLine:
    """The fields of one access line and its three renderings: the message (text lines and the
    JSON `msg`), the JSON fields, and the whole line as the formatters would write it."""

    __slots__ = (
        "app_id",
        "client",
        "duration",
        "hashed",
        "method",
        "path",
        "raw_path",
        "request_id",
        "sent",
        "status",
        "user_agent",
    )

    def __init__(
        self,
        request_id: str | None,
        app_id: str | None,
        method: str,
        path: str,
        raw_path: str,
        status: int,
        duration: float,
        hashed: str,
        client: str,
        sent: int,
        user_agent: str,
    ) -> None:
        self.request_id = request_id
        self.app_id = app_id
        self.method = method
        self.path = path
        self.raw_path = raw_path
        self.status = status
        self.duration = duration
        self.hashed = hashed
        self.client = client
        self.sent = sent
        self.user_agent = user_agent

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
        return f"{_asctime(time.time())} INFO {logger_name}: {escape_control(self.message())}\n"

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
            _queue(
                handler,
                line.json(self.logger.name) if handler.json_lines else line.text(self.logger.name),
            )
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
