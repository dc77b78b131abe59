"""The access log's fast path (app/access_log.py) writes what the logging formatters would
write; it is checked at start-up and gives way to `logging` when the check fails or
`FAST_PATHS=off`; held lines are written in order and on cleanup."""

from __future__ import annotations

import asyncio
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

from app import access_log, logs
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
    handler = logs.GatewayHandler(json_lines)
    handler.fast_access = True
    handler.setFormatter(logs.JsonFormatter() if json_lines else logs.TextFormatter())
    stream = io.StringIO()
    handler.setStream(stream)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    monkeypatch.setattr(access_log, "_perf_counter", lambda: NOW)
    fast: list[str] = []
    slow: list[str] = []
    for path, headers, middleware in REQUESTS:
        access = access_log.AccessLogger(
            logging.getLogger("hotpath.access"), ""
        )  # a pristine logger
        for duration in DURATIONS:
            request = _request(path, headers, duration, middleware)
            # aiohttp's own duration differs: the middleware's start must win when there is one.
            aiohttp_duration = duration + 1 if middleware else duration
            access.log(request, web.Response(status=201), aiohttp_duration)
            handler.flush()  # no event loop here: already written
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


def _gateway_logger(
    monkeypatch: pytest.MonkeyPatch, json_lines: bool = False
) -> tuple[logs.GatewayHandler, io.StringIO, access_log.AccessLogger]:
    handler = logs.GatewayHandler(json_lines)
    handler.setFormatter(logs.JsonFormatter() if json_lines else logs.TextFormatter())
    stream = io.StringIO()
    handler.setStream(stream)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    return handler, stream, access_log.AccessLogger(logging.getLogger("hotpath.access"), "")


async def test_the_self_check_passes_and_turns_the_fast_path_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler, stream, access = _gateway_logger(monkeypatch)
    assert access_log.self_check() is None
    assert access_log.enable_fast_path(handler, True) is True
    access.log(_request(*REQUESTS[0][:2], 0.001, True), web.Response(), 0.001)
    assert stream.getvalue() == ""  # held: the fast path
    handler.flush()
    assert "GET /apps/demo/session " in stream.getvalue()


@pytest.mark.parametrize("json_lines", [False, True])
def test_fast_paths_off_writes_every_line_through_logging(
    monkeypatch: pytest.MonkeyPatch, json_lines: bool
) -> None:
    handler, stream, access = _gateway_logger(monkeypatch, json_lines)
    assert access_log.enable_fast_path(handler, False) is False
    monkeypatch.setattr(logs.GatewayHandler, "write_line", _never)
    spy = mock.patch.object(handler, "handle", wraps=handler.handle)
    with spy as handled:
        access.log(_request(*REQUESTS[1][:2], 0.001, True), web.Response(), 0.001)
    assert handled.call_count == 1  # one `LogRecord` through `Logger.handle`
    line = stream.getvalue()
    assert line.count("\n") == 1 and "forged" in line  # written at once, escaped
    if json_lines:
        assert json.loads(line)["request_id"] == "rid-1"


def _never(self: logs.GatewayHandler, line: str) -> None:
    raise AssertionError("the fast path was taken")


def test_a_failed_self_check_keeps_the_fast_path_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fast rendering that drifted from the formatter's (here: the user agent dropped from
    JSON lines) is caught at start-up."""
    handler = logs.GatewayHandler(json_lines=True)
    original = access_log._AccessLine.json

    def drifted(self: access_log._AccessLine, logger_name: str) -> str:
        return original(self, logger_name).replace('"user_agent"', '"agent"')

    monkeypatch.setattr(access_log._AccessLine, "json", drifted)
    problem = access_log.self_check()
    assert problem is not None and problem.startswith("JSON line differs")
    assert access_log.enable_fast_path(handler, True) is False
    assert "every line through logging, not the fast path" in caplog.text


async def test_held_lines_come_before_later_records_and_are_flushed_at_cleanup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler, stream, _ = _gateway_logger(monkeypatch)
    handler.write_line("one\n")
    handler.write_line("two\n")
    logging.getLogger("hotpath.app").warning("three")
    assert stream.getvalue().splitlines()[:2] == ["one", "two"]
    assert stream.getvalue().splitlines()[2].endswith("WARNING hotpath.app: three")
    handler.write_line("four\n")
    await logs.flush_logs(web.Application())  # the app's on_cleanup hook
    assert stream.getvalue().endswith("four\n")
    handler.write_line("five\n")
    await asyncio.sleep(0)  # the end of the loop iteration
    assert stream.getvalue().endswith("five\n")
