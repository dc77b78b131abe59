"""The access log's own line formatting writes what the logging formatters would write."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from app import logs
from app.errors import REQUEST_ID_KEY
from app.sessions.middleware import SESSION_KEY
from app.sessions.storage import APP_ID_KEY

DURATIONS = [0.0, 0.00005, 0.00015, 0.00025, 0.01234, 0.099951, 1.23456, 61.0]
ASCTIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


def _lines(monkeypatch: pytest.MonkeyPatch, json_lines: bool) -> tuple[list[str], list[str]]:
    """(the fast path's lines, the formatter's lines) for the same requests."""
    handler = logs._GatewayHandler(json_lines)
    handler.setFormatter(
        logs.JsonFormatter() if json_lines else logging.Formatter(logs.TEXT_FORMAT)
    )
    stream = io.StringIO()
    handler.setStream(stream)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    access = logs.AccessLogger(logging.getLogger("hotpath.access"), "")  # a pristine logger
    fast: list[str] = []
    slow: list[str] = []
    for duration in DURATIONS:
        request = make_mocked_request("GET", "/apps/demo/session?token=x")
        request[SESSION_KEY] = None
        request[REQUEST_ID_KEY] = "rid-1"
        request[APP_ID_KEY] = "demo"
        access.log(request, web.Response(status=201), duration)
        logs._flush()
        fast.append(stream.getvalue())
        stream.seek(0)
        stream.truncate()
        handler.addFilter(lambda record: True)  # not the sole plain handler: the slow path
        access.log(request, web.Response(status=201), duration)
        slow.append(stream.getvalue())
        stream.seek(0)
        stream.truncate()
        handler.filters.clear()
    return fast, slow


def test_text_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow = _lines(monkeypatch, json_lines=False)
    for a, b in zip(fast, slow, strict=True):
        assert re.fullmatch(ASCTIME + r" INFO hotpath\.access: GET /apps/demo/session .*\n", a)
        assert a[23:] == b[23:]  # all but the time of day


def test_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow = _lines(monkeypatch, json_lines=True)
    for a, b in zip(fast, slow, strict=True):
        one, two = json.loads(a), json.loads(b)
        assert abs(one.pop("ts") - two.pop("ts")) < 5
        assert one == two
        assert list(json.loads(a)) == list(json.loads(b))  # same key order
