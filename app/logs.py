"""Logging setup: plain text or JSON lines (`LOG_FORMAT=json`); one access line per request.

Access lines carry the request id, application id, method, path (never the query string),
status, duration, and `session`: a salted hash of the session id, `sha256(salt || id)` cut to
16 hex characters, so the lines of one session can be correlated without the log revealing
the id, a cookie or a token. The salt is `LOG_SALT` (set the same value on every replica to
correlate across them) or, by default, random per process.

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
import secrets
import sys
import time

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from app.errors import REQUEST_ID_KEY
from app.sessions.middleware import SESSION_KEY
from app.sessions.storage import APP_ID_KEY

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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            line.update(extra)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


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
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
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
    """`%(asctime)s` (local time, `,mmm`) with the per-second part formatted once."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def asctime(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return self._prefix + _MILLIS[min(int((now - second) * 1000), 999)]


# ",000" ... ",999": the millisecond part of `asctime` without formatting a number per line.
_MILLIS = tuple(f",{ms:03d}" for ms in range(1000))


_clock = _Clock()

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


class AccessLogger(AbstractAccessLogger):
    """One line per request, without query strings (they may carry tokens)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, duration: float) -> None:
        # `request.get` is `Mapping.get` (Python code around `__getitem__`); the gateway
        # middleware sets the session and request id on every request it sees, so look them up
        # directly and fall back only for requests that never reached it.
        try:
            session = request[SESSION_KEY]
            request_id = request[REQUEST_ID_KEY]
        except KeyError:
            session = request.get(SESSION_KEY)
            request_id = request.get(REQUEST_ID_KEY, "")
        identity = session.identity if session is not None else None
        app_id = request.get(APP_ID_KEY, "")
        method = request.method
        path = request.rel_url.path
        status = response.status
        hashed = session_hash(identity) if isinstance(identity, str) else ""
        handler = _sole_handler(self.logger)
        if handler is not None:
            self._write(handler, request_id, app_id, method, path, status, duration, hashed)
            return
        fields = {
            "request_id": request_id,
            "application_id": app_id,
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(duration * 1000, 2),
            "session": hashed,
        }
        self.logger.info(
            "%s %s %s %.1fms request_id=%s app=%s session=%s",
            method,
            path,
            status,
            duration * 1000,
            request_id,
            app_id or "-",
            hashed or "-",
            extra={"fields": fields},
        )

    def _write(
        self,
        handler: _GatewayHandler,
        request_id: str,
        app_id: str,
        method: str,
        path: str,
        status: int,
        duration: float,
        hashed: str,
    ) -> None:
        # The same bytes the formatters would produce for this record.
        now = time.time()
        millis = "%.1f" % (duration * 1000)  # %-format: cheaper than an f-string format spec
        msg = (
            f"{method} {path} {status} {millis}ms request_id={request_id} "
            f"app={app_id or '-'} session={hashed or '-'}"
        )
        if handler.json_lines:
            dumps = json.dumps
            line = (
                f'{{"ts": {round(now, 3)!r}, "level": "info", "logger": {dumps(self.logger.name)}, '
                f'"msg": {dumps(msg)}, "request_id": {dumps(request_id)}, '
                f'"application_id": {dumps(app_id)}, "method": {dumps(method)}, '
                f'"path": {dumps(path)}, "status": {status}, '
                f'"duration_ms": {round(duration * 1000, 2)!r}, "session": "{hashed}"}}\n'
            )
        else:
            line = f"{_clock.asctime(now)} INFO {self.logger.name}: {msg}\n"
        _queue(handler, line)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
