"""The access log's own line formatting writes what the logging formatters would write."""

from __future__ import annotations

import datetime
import io
import json
import logging
import re
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from app import logs
from app.errors import REQUEST_ID_KEY
from app.sessions.middleware import SESSION_KEY
from app.sessions.storage import APP_ID_KEY
from app.state import SETTINGS_KEY
from tests.conftest import make_settings

DURATIONS = [0.0, 0.00005, 0.00015, 0.00025, 0.01234, 0.099951, 1.23456, 61.0]
ASCTIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
# (raw path, headers): a plain request, then hostile bytes in the path and the user agent
# (controls, DEL, C1, U+2028, a lone surrogate as aiohttp makes one from an undecodable header
# byte, a backslash, quotes), then a request through a trusted proxy.
REQUESTS: list[tuple[str, dict[str, str]]] = [
    ("/apps/demo/session?token=x", {"User-Agent": "curl/8.5.0"}),
    (
        "/apps/demo/%0a2026-01-01%20INFO%20forged%1b[31m%7f%c2%85%e2%80%a8%5c%22",
        {"User-Agent": 'ua\udcff\u2028 "q" \\ \U0001f600 \u202e'},
    ),
    ("/apps/demo/session", {"X-Forwarded-For": "203.0.113.9, 10.0.0.2"}),
]


def _request(path: str, headers: dict[str, str]) -> web.Request:
    app = web.Application()
    app[SETTINGS_KEY] = make_settings(TRUSTED_PROXIES="10.0.0.0/8")
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda key, default=None: (
        ("10.0.0.1", 50000) if key == "peername" else default
    )
    request = make_mocked_request("GET", path, app=app, transport=transport)
    # As aiohttp's parser makes them (undecodable bytes as lone surrogates), which
    # `make_mocked_request` cannot: it encodes the values strictly.
    request._headers = CIMultiDictProxy(CIMultiDict(headers))
    request[SESSION_KEY] = None
    request[REQUEST_ID_KEY] = "rid-1"
    request[APP_ID_KEY] = "demo"
    return request


def _lines(monkeypatch: pytest.MonkeyPatch, json_lines: bool) -> tuple[list[str], list[str]]:
    """(the fast path's lines, the formatter's lines) for the same requests."""
    handler = logs._GatewayHandler(json_lines)
    handler.setFormatter(logs.JsonFormatter() if json_lines else logs.TextFormatter())
    stream = io.StringIO()
    handler.setStream(stream)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    fast: list[str] = []
    slow: list[str] = []
    for path, headers in REQUESTS:
        access = logs.AccessLogger(logging.getLogger("hotpath.access"), "")  # a pristine logger
        for duration in DURATIONS:
            request = _request(path, headers)
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
        assert re.fullmatch(ASCTIME + r" INFO hotpath\.access: GET /apps/demo/\S+ .*\n", a)
        assert a[23:] == b[23:]  # all but the time of day
        assert a.isprintable() is False and a[:-1].isprintable()  # one line, nothing hidden
    assert "client=203.0.113.9 " in fast[-1]  # the last untrusted hop behind 10.0.0.0/8


def test_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow = _lines(monkeypatch, json_lines=True)
    for a, b in zip(fast, slow, strict=True):
        assert a.count("\n") == 1 and a.endswith("\n") and a.isascii()
        one, two = json.loads(a), json.loads(b)
        times = [datetime.datetime.fromisoformat(line.pop("ts")) for line in (one, two)]
        assert abs(times[0] - times[1]) < datetime.timedelta(seconds=5)
        assert one == two
        assert list(json.loads(a)) == list(json.loads(b))  # same key order
        # Every value is valid Unicode (no lone surrogate that strict parsers refuse).
        json.dumps(one, ensure_ascii=False).encode("utf-8")
    assert json.loads(fast[-1])["client"] == "203.0.113.9"
