"""Logging setup: plain text or JSON lines (`LOG_FORMAT=json`); one access line per request.

Access lines carry the request id, application id, method, path (never the query string),
status, duration, and `session`: a salted hash of the session id, `sha256(salt || id)` cut to
16 hex characters, so the lines of one session can be correlated without the log revealing
the id, a cookie or a token. The salt is `LOG_SALT` (set the same value on every replica to
correlate across them) or, by default, random per process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sys

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from app.errors import REQUEST_ID_KEY
from app.sessions.middleware import SESSION_KEY
from app.sessions.storage import APP_ID_KEY

_salt: bytes = secrets.token_bytes(32)


def set_log_salt(salt: str | None) -> None:
    """Use `salt` for session hashes; empty or None means a fresh random one (per process)."""
    global _salt
    _salt = salt.encode("utf-8") if salt else secrets.token_bytes(32)


def session_hash(session_id: str) -> str:
    """`sha256(salt || session_id)`, first 16 hex characters: correlates, never reveals."""
    return hashlib.sha256(_salt + session_id.encode("utf-8")).hexdigest()[:16]


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


def configure_logging(level: str, fmt: str, *, salt: str | None = None) -> None:
    set_log_salt(salt)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class AccessLogger(AbstractAccessLogger):
    """One line per request, without query strings (they may carry tokens)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, duration: float) -> None:
        session = request.get(SESSION_KEY)
        identity = session.identity if session is not None else None
        fields = {
            "request_id": request.get(REQUEST_ID_KEY, ""),
            "application_id": request.get(APP_ID_KEY, ""),
            "method": request.method,
            "path": request.rel_url.path,
            "status": response.status,
            "duration_ms": round(duration * 1000, 2),
            "session": session_hash(identity) if isinstance(identity, str) else "",
        }
        self.logger.info(
            "%s %s %s %.1fms request_id=%s app=%s session=%s",
            request.method,
            request.rel_url.path,
            response.status,
            duration * 1000,
            fields["request_id"],
            fields["application_id"] or "-",
            fields["session"] or "-",
            extra={"fields": fields},
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
