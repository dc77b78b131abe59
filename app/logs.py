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

The access log (`AccessLogger`) and its fenced fast path are app/access_log.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar, Token

from aiohttp import web

from app.keys import APP_ID_KEY, REQUEST_ID_KEY, REQUEST_STARTED_KEY

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


class GatewayHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure_logging` installs (stderr): `json_lines` says which layout it
    writes. Records are written at once, as `StreamHandler` writes them.

    `write_line` is the access log's fast path (app/access_log.py, used only when
    `fast_access`): a line already formatted as the formatter would, held until the end of the
    event-loop iteration and written together with the others of that iteration (one write and
    flush instead of one per request). `flush()` writes what is held: at the end of the
    iteration, before any record (lines stay in order), at the app's cleanup (`flush_logs`) and
    at interpreter exit (`logging.shutdown` flushes every handler).
    """

    def __init__(self, json_lines: bool) -> None:
        super().__init__(sys.stderr)
        self.json_lines = json_lines
        self.fast_access = False
        self._held: list[str] = []

    def write_line(self, line: str) -> None:
        """Write `line` (ending in a newline) at the end of this event-loop iteration."""
        held = self._held
        held.append(line)
        if len(held) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop: write now
                self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_held()
            super().flush()
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        if self._held:
            self.acquire()
            try:
                self._write_held()
            finally:
                self.release()
        super().emit(record)

    def _write_held(self) -> None:
        if not self._held:
            return
        text = "".join(self._held)
        self._held.clear()
        try:
            self.stream.write(text)
        except Exception:  # as StreamHandler.emit: a broken stderr must not fail the request
            self.handleError(logging.makeLogRecord({"msg": text}))


def configure_logging(level: str, fmt: str, *, salt: str | None = None) -> GatewayHandler:
    """The root logger writes to stderr through one `GatewayHandler` (text or JSON lines) at
    `level`; returns that handler (app/access_log.py decides whether its fast path is used)."""
    set_log_salt(salt)
    handler = GatewayHandler(fmt == "json")
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return handler


async def flush_logs(app: web.Application) -> None:
    """Write what the root logger's handlers hold (the app's `on_cleanup` hook)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


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
# `text_time(time.time())` -> e.g. `2026-12-03 18:20:52,123` (what `%(asctime)s` writes).
text_time = _Clock("%Y-%m-%d %H:%M:%S", time.localtime, tuple(f",{ms:03d}" for ms in range(1000)))
iso_time = _Clock("%Y-%m-%dT%H:%M:%S", time.gmtime, tuple(f".{ms:03d}Z" for ms in range(1000)))
"""`iso_time(time.time())` -> e.g. `2026-12-03T18:20:52.123Z` (the `ts` of JSON lines)."""
