"""JSON logs as operators expect them (issue 15 item 9), from a real `python -m app`: ISO 8601
UTC timestamps, `request_id` and `application` on every line written inside a request, and
access lines with the client address, user agent, bytes sent and a sub-millisecond duration."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from app import logs
from app.keys import APP_ID_KEY, REQUEST_ID_KEY
from app.loadkit.ports import free_port
from tests.conftest import CSRF, GatewayProcessFactory

ISO_UTC_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _records(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines()]


@pytest.mark.parametrize("fast_paths", ["auto", "off"])
async def test_json_lines_carry_iso_time_request_context_and_client_details(
    gateway_process: GatewayProcessFactory, tmp_path: Path, fast_paths: str
) -> None:
    """The same lines from the access log's fast path (app/access_log.py) and through
    `logging` (`FAST_PATHS=off`)."""
    apps = tmp_path / "apps.toml"
    apps.write_text(
        '[apps.demo]\nupstream = "builtin:demo"\n\n'
        f'[apps.down]\nupstream = "http://127.0.0.1:{free_port()}/agent"\n'
    )
    proc = gateway_process(
        {
            "LOG_FORMAT": "json",
            "SESSION_STORE": "memory",
            "APPS_FILE": str(apps),
            "TRUSTED_PROXIES": "127.0.0.1/32",
            "FAST_PATHS": fast_paths,
        }
    )
    before = datetime.datetime.now(datetime.UTC)
    async with aiohttp.ClientSession(str(proc.url)) as client:
        async with client.patch(
            "/apps/demo/session",
            json={"a": 1},
            headers={
                **CSRF,
                "X-Request-Id": "req-json-1",
                "X-Forwarded-For": "198.51.100.7",
                "User-Agent": "probe/1.0 (test)",
            },
        ) as resp:
            assert resp.status == 200
            body = await resp.read()
        async with client.get("/apps/down/agent/x", headers={"X-Request-Id": "req-json-2"}) as resp:
            assert resp.status == 502
    after = datetime.datetime.now(datetime.UTC)
    assert proc.stop() == 0
    records = _records(proc.stderr)

    for record in records:
        assert ISO_UTC_MS.fullmatch(record["ts"]), record
        ts = datetime.datetime.fromisoformat(record["ts"])
        assert ts.utcoffset() == datetime.timedelta(0)
    access = [r for r in records if r["logger"] == "aiohttp.access"]
    patch = next(r for r in access if r["request_id"] == "req-json-1")
    assert (
        before - datetime.timedelta(seconds=1)
        <= datetime.datetime.fromisoformat(patch["ts"])
        <= after + datetime.timedelta(seconds=1)
    )
    assert patch["application"] == "demo"
    assert patch["client"] == "198.51.100.7"  # behind a trusted proxy: the forwarded client
    assert patch["user_agent"] == "probe/1.0 (test)"
    assert patch["bytes_sent"] > len(body)  # headers included
    assert patch["status"] == 200 and patch["method"] == "PATCH"

    # A line written inside the request (the proxy's warning): the request's context as fields.
    warning = next(r for r in records if r["msg"].startswith("upstream unavailable"))
    assert warning["level"] == "warning"
    assert warning["request_id"] == "req-json-2"
    assert warning["application"] == "down"
    # Lines outside any request carry no request fields.
    listening = next(r for r in records if r["msg"].startswith("listening on"))
    assert "request_id" not in listening and "application" not in listening
    # A request without an application: null, not an empty string or a made-up id.
    healthz = [r for r in access if r["path"] == "/healthz"]
    assert healthz and all(r["application"] is None for r in healthz)


async def test_access_durations_have_sub_millisecond_resolution(
    gateway_process: GatewayProcessFactory,
) -> None:
    """Under uvloop aiohttp's own duration is whole milliseconds (1.0, 0.0, 1.0 ...)."""
    proc = gateway_process({"LOG_FORMAT": "json", "SESSION_STORE": "memory"})
    async with aiohttp.ClientSession(str(proc.url)) as client:
        for _ in range(30):
            async with client.get("/healthz") as resp:
                assert resp.status == 200
    assert proc.stop() == 0
    assert "event loop: uvloop" in proc.stderr  # the loop that made whole milliseconds
    durations = [
        r["duration_ms"]
        for r in _records(proc.stderr)
        if r["logger"] == "aiohttp.access" and r["path"] == "/healthz"
    ]
    assert len(durations) >= 30
    fractional = [d for d in durations if d != int(d)]
    assert len(fractional) >= len(durations) * 0.9, durations
    assert len(set(durations)) >= len(durations) // 2, durations
    assert all(0 < d < 1000 for d in durations), durations


async def test_a_task_outliving_its_request_stops_speaking_for_it() -> None:
    """A task started inside a request copies its context (a batch sender, a sweeper started by
    the first request): once the request is done, its lines carry no request fields."""
    formatter = logs.JsonFormatter()
    request = make_mocked_request("GET", "/apps/demo/session")
    request[REQUEST_ID_KEY] = "req-ctx"
    request[APP_ID_KEY] = "demo"
    go_on = asyncio.Event()

    async def background() -> tuple[dict[str, Any], dict[str, Any]]:
        during = json.loads(formatter.format(logging.makeLogRecord({"msg": "during"})))
        await go_on.wait()
        later = json.loads(formatter.format(logging.makeLogRecord({"msg": "later"})))
        return during, later

    token = logs.bind_request(request, time.perf_counter())
    task = asyncio.create_task(background())
    await asyncio.sleep(0)
    logs.release_request(token)
    go_on.set()
    during, later = await task
    assert (during["request_id"], during["application"]) == ("req-ctx", "demo")
    assert "request_id" not in later and "application" not in later
    outside = json.loads(formatter.format(logging.makeLogRecord({"msg": "outside"})))
    assert "request_id" not in outside
