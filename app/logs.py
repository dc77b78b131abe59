"""Logging setup: plain text or JSON lines; one access line per request.

Access lines carry the request id, application id, status and duration, never a cookie, a
session id or a token.
"""

from __future__ import annotations

import json
import logging
import sys

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from app.errors import REQUEST_ID_KEY
from app.sessions.storage import APP_ID_KEY


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


def configure_logging(level: str, fmt: str) -> None:
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
        fields = {
            "request_id": request.get(REQUEST_ID_KEY, ""),
            "application_id": request.get(APP_ID_KEY, ""),
            "method": request.method,
            "path": request.rel_url.path,
            "status": response.status,
            "duration_ms": round(duration * 1000, 2),
        }
        self.logger.info(
            "%s %s %s %.1fms request_id=%s app=%s",
            request.method,
            request.rel_url.path,
            response.status,
            duration * 1000,
            fields["request_id"],
            fields["application_id"] or "-",
            extra={"fields": fields},
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
