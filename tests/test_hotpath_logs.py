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
from app.keys import APP_ID_KEY, REQUEST_ID_KEY, REQUEST_STARTED_KEY, SESSION_KEY, SETTINGS_KEY
from tests.conftest import make_settings

DURATIONS = [0.0, 0.00005, 0.00015, 0.00025, 0.01234, 0.099951, 1.23456, 61.0]
ASCTIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
# (raw path, headers, through the gateway middleware): a plain request, then hostile bytes in
# the path and the user agent (controls, DEL, C1, U+2028, a lone surrogate as aiohttp makes one
# from an undecodable header byte, a backslash, quotes), then a request through a trusted proxy,
# then one refused before the middleware (aiohttp's own 400: no request id, no start time).
REQUESTS: list[tuple[str, dict[str, str], bool]] = [
    ("/apps/demo/session?token=x", {"User-Agent": "curl/8.5.0"}, True),
    (
        "/apps/demo/%0a2026-01-01%20INFO%20forged%1b[31m%7f%c2%85%e2%80%a8%5c%22",
        {"User-Agent": 'ua\udcff\u2028 "q" \\ \U0001f600 \u202e'},
        True,
    ),
    ("/apps/demo/session", {"X-Forwarded-For": "203.0.113.9, 10.0.0.2"}, True),
    ("/apps/demo/session", {}, False),
]
NOW = 1000.0  # what `perf_counter` says while the lines are written


def _request(path: str, headers: dict[str, str], duration: float, middleware: bool) -> web.Request:
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
    if middleware:
        request[SESSION_KEY] = None
        request[REQUEST_ID_KEY] = "rid-1"
        request[APP_ID_KEY] = "demo"
        request[REQUEST_STARTED_KEY] = NOW - duration
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
    monkeypatch.setattr(logs, "_perf_counter", lambda: NOW)
    fast: list[str] = []
    slow: list[str] = []
    for path, headers, middleware in REQUESTS:
        access = logs.AccessLogger(logging.getLogger("hotpath.access"), "")  # a pristine logger
        for duration in DURATIONS:
            request = _request(path, headers, duration, middleware)
            # aiohttp's own duration differs: the middleware's start must win when there is one.
            aiohttp_duration = duration + 1 if middleware else duration
            access.log(request, web.Response(status=201), aiohttp_duration)
            logs._flush()
            fast.append(stream.getvalue())
            stream.seek(0)
            stream.truncate()
            handler.addFilter(lambda record: True)  # not the sole plain handler: the slow path
            access.log(request, web.Response(status=201), aiohttp_duration)
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
    proxied = fast[3 * len(DURATIONS) - 1]  # the third request's last line
    assert "client=203.0.113.9 " in proxied  # the last untrusted hop behind 10.0.0.0/8


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
    assert json.loads(fast[3 * len(DURATIONS) - 1])["client"] == "203.0.113.9"


def test_the_duration_is_the_middlewares_when_there_is_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast, _ = _lines(monkeypatch, json_lines=True)
    durations = [json.loads(line)["duration_ms"] for line in fast]
    expected = [round(d * 1000, 3) for d in DURATIONS]
    assert durations == expected * len(REQUESTS)
    assert [json.loads(line)["request_id"] for line in fast][-1] is None  # refused early
