"""The load-testing kit (app/loadkit): short real runs against `python -m app` processes
with the SSE upstream stub, and in-process runs against fake gateways for the error kinds.

The runs are short (1-3 s) and assert counts, never speed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from app.loadkit.arguments import TargetRefused, check_target, parse_mix, parse_rate
from app.loadkit.ports import free_port
from app.loadkit.recording import LoadConfig, Recorder
from app.loadkit.report import Thresholds, build_report, format_summary
from app.loadkit.runner import run_load
from app.loadkit.sse import SSEParser
from app.loadkit.stub import create_stub
from tests.gateway_process import REPO_ROOT, GatewayProcess
from tests.redis_server import RedisServer

SCRIPTS = REPO_ROOT / "scripts"

LOADGEN = SCRIPTS / "loadgen.py"
STUB = SCRIPTS / "upstream_stub.py"
EVENTS = 7  # events per stub stream in these tests


# -- processes ------------------------------------------------------------------------------


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout}s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stub_url(tier_system: None) -> Iterator[str]:
    """`scripts/upstream_stub.py` as a process; its base URL (with a base path)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(STUB), "--port", str(port), "--events", str(EVENTS), "--size", "64"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        yield f"http://127.0.0.1:{port}/base"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _apps_file(directory: Path, stub_url: str) -> Path:
    path = directory / "apps.toml"
    dead = f"http://127.0.0.1:{free_port()}/base"  # nothing listens there: 502
    path.write_text(
        f'[apps.demo]\nupstream = "{stub_url}"\n\n'
        f'[apps.dead]\nupstream = "{dead}"\nconnect_timeout_seconds = 1\n\n'
        f'[apps.runs]\nupstream = "{stub_url}"\nresumable = true\n'
    )
    return path


@pytest.fixture(scope="module")
def memory_gateway_url(
    tier_system: None, stub_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One memory-store gateway process for the module's runs (apps `demo` and `dead`)."""
    apps = _apps_file(tmp_path_factory.mktemp("loadkit"), stub_url)
    env = {"SESSION_STORE": "memory", "APPS_FILE": str(apps), "LOG_LEVEL": "warning"}
    with GatewayProcess(env) as gateway:
        yield gateway.url


def loadgen(*args: str, timeout: float = 60.0) -> tuple[int, dict[str, Any], str]:
    """Run `scripts/loadgen.py ... --json` as a user would: (exit code, report, stderr)."""
    proc = subprocess.run(
        [sys.executable, str(LOADGEN), *args, "--json", "--no-progress"],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    stderr = proc.stderr.decode(errors="replace")
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {}
    return proc.returncode, report, stderr


def assert_consistent(report: dict[str, Any]) -> None:
    """The report's counts add up, whatever happened."""
    kinds = report["kinds"]
    assert report["requests"] == sum(k["count"] for k in kinds.values())
    assert report["errors"] == sum(k["errors"] for k in kinds.values())
    assert report["errors"] == sum(report["errors_by_kind"].values())
    for kind in kinds.values():
        assert kind["count"] == kind["ok"] + kind["errors"]
        assert kind["latency_ms"]["count"] == kind["ok"]
    stream = report["stream"]
    assert stream["attempted"] == kinds["stream"]["count"]
    assert stream["completed"] == kinds["stream"]["ok"]
    assert stream["completed"] <= stream["started"] <= stream["attempted"]
    assert stream["ttfe_ms"]["count"] <= stream["started"]
    sessions = report["sessions"]
    assert sessions["users_with_loss"] <= sessions["users"]
    assert sessions["lost"] + sessions["stale"] <= sessions["checks"]
    timeline = report["timeline"]["series"]
    for kind, row in kinds.items():
        assert sum(slot["count"] for slot in timeline.get(kind, [])) == row["count"]


# -- real runs ------------------------------------------------------------------------------


def test_short_run_against_memory_gateway(memory_gateway_url: str, tmp_path: Path) -> None:
    html = tmp_path / "report.html"
    code, report, stderr = loadgen(
        "--url", memory_gateway_url, "-c", "6", "-d", "2", "--ramp-up", "0.3",
        "--mix", "read=40,write=30,stream=30", "--html", str(html),
    )  # fmt: skip
    assert code == 0, stderr
    assert report["passed"] is True
    assert_consistent(report)
    kinds = report["kinds"]
    assert kinds["create"]["count"] == 6  # one session per virtual user, never re-created
    assert min(kinds[k]["ok"] for k in ("read", "write", "stream")) > 0
    assert report["errors"] == 0
    stream = report["stream"]
    assert stream["completion_ratio"] == 1.0
    # Every complete stream is EVENTS tokens plus the end event, each timed.
    assert stream["events"] == stream["completed"] * (EVENTS + 1)
    assert stream["ttfe_ms"]["count"] == stream["completed"]
    assert stream["gap_ms"]["count"] == stream["completed"] * EVENTS
    sessions = report["sessions"]
    assert sessions["lost"] == sessions["stale"] == 0
    assert sessions["created"] == 6
    # Every successful create/read/write response was checked against what the user wrote.
    assert sessions["checks"] == sum(kinds[k]["ok"] for k in ("create", "read", "write"))
    # The human summary went to stderr because the JSON took stdout.
    assert "sessions  created 6" in stderr
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "passed all thresholds" in page


def test_resume_kind_cuts_and_resumes_runs_without_losing_an_event(
    memory_gateway_url: str,
) -> None:
    code, report, stderr = loadgen(
        "--url", memory_gateway_url, "--app", "runs", "-c", "4", "-d", "2",
        "--mix", "resume=1", "--agent-path", "chat?events=40&pause_ms=5",
    )  # fmt: skip
    assert code == 0, stderr
    assert_consistent(report)
    resume = report["resume"]
    assert resume["runs"] == report["kinds"]["resume"]["count"] > 0
    assert resume["completed"] == resume["runs"]
    assert resume["resume_requests"] >= resume["runs"] // 2  # most were cut before the end
    assert resume["lost_events"] == resume["duplicated_events"] == resume["orphaned"] == 0
    assert report["passed"] is True


def test_request_cap_stops_the_run(memory_gateway_url: str) -> None:
    code, report, stderr = loadgen(
        "--url", memory_gateway_url, "-c", "4", "-d", "30", "-n", "40", "--mix", "read=1",
    )  # fmt: skip
    assert code == 0, stderr
    assert_consistent(report)
    # 40 capped requests, plus each user's final verification read.
    assert report["requests"] == 40 + 4
    assert report["elapsed_s"] < 20


def test_thresholds_make_it_exit_non_zero(memory_gateway_url: str) -> None:
    # Application `dead` has an upstream nobody listens on: every stream is a 502.
    code, report, stderr = loadgen(
        "--url", memory_gateway_url, "--app", "dead", "-c", "3", "-d", "1",
        "--mix", "read=50,stream=50", "--max-error-rate", "1%", "--max-p99-ms", "0.001",
        "--min-samples", "1",
    )  # fmt: skip
    assert code == 1, stderr
    assert_consistent(report)
    assert report["errors_by_kind"].get("status_502", 0) == report["kinds"]["stream"]["count"] > 0
    violations = " | ".join(report["thresholds"]["violations"])
    assert "error rate" in violations
    assert "read p99" in violations
    assert report["passed"] is False
    assert "FAILED" in stderr


def test_hard_deadline_ends_stuck_streams(memory_gateway_url: str) -> None:
    started = time.monotonic()
    code, report, stderr = loadgen(
        "--url", memory_gateway_url, "-c", "3", "-d", "1", "--grace", "0.5",
        "--mix", "stream=1", "--agent-path", "stream?events=3&pause_ms=30000",
        "--stream-idle-timeout", "60",
    )  # fmt: skip
    assert time.monotonic() - started < 20
    assert code == 0, stderr
    assert report["aborted_at_deadline"] == 3
    assert report["kinds"]["stream"]["count"] == 0  # aborted requests are not errors
    assert_consistent(report)


def test_flushing_redis_mid_run_counts_lost_sessions(
    stub_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    users = 5
    apps = _apps_file(tmp_path, stub_url)
    env = {
        "SESSION_STORE": "redis",
        "REDIS_URL": redis_server.url,
        "APPS_FILE": str(apps),
        "LOG_LEVEL": "warning",
    }
    client = redis_server.client()
    with GatewayProcess(env) as gateway:
        proc = subprocess.Popen(
            [
                sys.executable, str(LOADGEN), "--url", gateway.url, "-c", str(users), "-d", "3",
                "--mix", "read=40,write=40,stream=20", "--think-ms", "20", "--json",
                "--no-progress",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            # Once every user has its session in Redis, wipe them all.
            deadline = time.monotonic() + 15
            while int(client.dbsize()) < users:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the users never created their sessions"
                time.sleep(0.02)
            client.flushall()
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            client.close()
    report = json.loads(out)
    assert proc.returncode == 1, err.decode()
    assert_consistent(report)
    sessions = report["sessions"]
    # Each user noticed its loss exactly once (then re-created its session), at the latest
    # in its final verification read.
    assert sessions["lost"] == sessions["users_with_loss"] == users
    assert sessions["recreated"] == users
    assert "lost sessions" in " ".join(report["thresholds"]["violations"])


@pytest.mark.system
def test_non_loopback_url_refused_without_allow_remote() -> None:
    # TEST-NET-1 (RFC 5737): refused before anything is sent.
    proc = subprocess.run(
        [sys.executable, str(LOADGEN), "--url", "http://192.0.2.1:8080", "-d", "1"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert b"--allow-remote" in proc.stderr
    for url in (
        "http://127.0.0.1:8080",
        "http://localhost:1",
        "http://[::1]:80",
        "http://127.1.2.3",
    ):
        check_target(url, allow_remote=False)
    for url in ("http://example.com", "http://10.0.0.1", "ftp://127.0.0.1", "http://0.0.0.0:80"):
        with pytest.raises(TargetRefused):
            check_target(url, allow_remote=False)
    check_target("http://example.com", allow_remote=True)


@pytest.mark.system
def test_unreachable_target_exits_3() -> None:
    code, _, stderr = loadgen("--url", f"http://127.0.0.1:{free_port()}", "-d", "1")
    assert code == 3
    assert "nothing answers" in stderr


def test_option_parsing() -> None:
    assert parse_mix("read=3,stream=1") == {
        "read": 3.0,
        "write": 0.0,
        "stream": 1.0,
        "resume": 0.0,
    }
    assert parse_rate("2.5%") == pytest.approx(0.025)
    assert parse_rate("0.1") == pytest.approx(0.1)
    assert parse_rate("none") is None


@pytest.mark.system
def test_help_shows_the_defaults() -> None:
    proc = subprocess.run(
        [sys.executable, str(LOADGEN), "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for shown in (
        "virtual users (default: 10)",
        "(default: http://127.0.0.1:8080)",
        "(default: read=60,write=20,stream=20)",
        "(default: chat)",
        "(default: 1%)",
        "(default: 100)",
        "'none' disables (default: 0)",
    ):
        assert shown in text, shown


# -- verdicts: a run that did not work does not pass ----------------------------------------


def test_an_unknown_application_fails_by_default(memory_gateway_url: str) -> None:
    """Before: 100% errors, "passed", exit 0."""
    code, report, stderr = loadgen("--url", memory_gateway_url, "--app", "nosuch", "-d", "1")
    assert code == 1, stderr
    assert report["error_rate"] == 1.0
    assert any("error rate 100.00%" in v for v in report["thresholds"]["violations"])
    assert "hint: 404 on the session API: the gateway has no application 'nosuch'" in stderr
    # `none` switches the default error-rate limit off.
    code, report, stderr = loadgen(
        "--url", memory_gateway_url, "--app", "nosuch", "-d", "1", "--max-error-rate", "none"
    )
    assert code == 0, stderr
    assert report["thresholds"]["limits"]["max_error_rate"] is None


def test_no_completed_stream_fails_whatever_the_error_rate(memory_gateway_url: str) -> None:
    """Before: `--agent-path stream` on the demo agent, 0/1,599 streams, "passed"."""
    code, report, stderr = loadgen(
        "--url", memory_gateway_url, "-c", "2", "-d", "1", "--agent-path", "nosuch",
        "--max-error-rate", "none",
    )  # fmt: skip
    assert code == 1, stderr
    assert report["stream"]["attempted"] > 0 and report["stream"]["completed"] == 0
    violation = " ".join(report["thresholds"]["violations"])
    assert "no stream completed" in violation and "--agent-path 'nosuch'" in violation
    assert "hint: 404 on streams" in stderr


@pytest.mark.system
def test_defaults_run_against_the_built_in_demo_agent() -> None:
    """`scripts/run` + `loadgen.py` with no options (only the test's port and a short run)."""
    with GatewayProcess({"LOG_LEVEL": "warning"}) as gateway:
        code, report, stderr = loadgen("--url", gateway.url, "-d", "2", "-c", "4")
    assert code == 0, stderr
    assert_consistent(report)
    assert report["config"]["app"] == "demo" and report["config"]["agent_path"] == "chat"
    stream = report["stream"]
    assert stream["attempted"] > 0 and stream["completion_ratio"] == 1.0
    assert report["errors"] == 0
    assert "passed" in stderr


def _recording(samples: dict[str, list[float]]) -> Recorder:
    rec = Recorder(10.0)
    for kind, values in samples.items():
        for i, seconds in enumerate(values):
            rec.success(kind, i * 0.01, seconds)
    rec.finished = 10.0
    return rec


def test_percentile_thresholds_skip_small_samples_and_say_so() -> None:
    """Before: the README's `--max-p99-ms 50` failed on 50 creates made during the ramp-up."""
    config = LoadConfig(url="http://127.0.0.1:1", concurrency=50)
    rec = _recording({"create": [0.2] * 50, "read": [0.001] * 500, "write": [0.002] * 150})
    report = build_report(rec, config, Thresholds(max_p99_ms=50))
    assert report["passed"] is True
    assert report["thresholds"]["not_checked"] == [
        "create p99 not checked against --max-p99-ms: not enough samples (50 < --min-samples 100)"
    ]
    assert "note: create p99 not checked" in format_summary(report)
    strict = build_report(rec, config, Thresholds(max_p99_ms=50, min_samples=50))
    [violation] = strict["thresholds"]["violations"]
    assert violation.startswith("create p99 200.") and violation.endswith("> --max-p99-ms 50")
    slow_reads = _recording({"create": [0.001] * 50, "read": [0.08] * 500})
    report = build_report(slow_reads, config, Thresholds(max_p99_ms=50))
    [violation] = report["thresholds"]["violations"]
    assert violation.startswith("read p99 80.") and violation.endswith("> --max-p99-ms 50")


# -- the SSE parser and the stub ------------------------------------------------------------


def test_sse_parser_handles_split_lines_comments_and_truncation() -> None:
    parser = SSEParser()
    raw = b": keep-alive\r\nid: 1\r\nevent: token\r\ndata: a\r\ndata: b\r\n\r\ndata: c\n\n"
    events = []
    for i in range(len(raw)):  # one byte at a time: CRLF split across chunks
        events += parser.feed(raw[i : i + 1])
    assert [(e.type, e.data, e.id) for e in events] == [
        ("token", "a\nb", "1"),
        ("message", "c", "1"),  # the last event id persists (WHATWG SSE)
    ]
    assert parser.comments == 1
    assert not parser.pending
    parser.feed(b"event: done\ndata: {")
    assert parser.pending


async def test_stub_streams_deterministic_sse(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_stub())
    resp = await client.post("/any/base/stream?events=4&size=30", data=b'{"x": 1}')
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    events = SSEParser().feed(await resp.read())
    assert [e.type for e in events] == ["token"] * 4 + ["done"]
    assert all(len(e.data) == 30 for e in events[:4])
    assert [e.id for e in events[:4]] == ["0", "1", "2", "3"]
    assert json.loads(events[-1].data) == {"events": 4}
    again = SSEParser().feed(await (await client.get("/b/stream?events=4&size=30")).read())
    assert [e.data for e in again] == [e.data for e in events]
    resp = await client.get("/x/json", headers={"X-Agent-Thread-Id": "t1"})
    assert (await resp.json())["thread_id"] == "t1"
    assert (await client.get("/x/stream?events=-1")).status == 400


# -- error kinds and continuity against fake gateways (in-process) ---------------------------


class FakeGateway:
    """The session API and an agent route with scripted failures, per agent path."""

    def __init__(self, *, drop_writes: bool = False) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.drop_writes = drop_writes
        self.app = web.Application()
        self.app.router.add_get("/apps/t/session", self.read)
        self.app.router.add_patch("/apps/t/session", self.write)
        self.app.router.add_post("/apps/t/agent/{path}", self.agent)
        self.app.router.add_get("/healthz", self.healthz)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def read(self, request: web.Request) -> web.Response:
        sid = request.cookies.get("sid", "")
        return web.json_response({"data": self.sessions.get(sid, {})})

    async def write(self, request: web.Request) -> web.Response:
        sid = request.cookies.get("sid", "")
        current = dict(self.sessions.get(sid, {}))
        current.update(await request.json())
        response = web.json_response({"data": current})
        if sid not in self.sessions:
            sid = f"s{len(self.sessions)}"
            response.set_cookie("sid", sid, path="/apps/t")
            self.sessions[sid] = current
        elif not self.drop_writes:
            self.sessions[sid] = current
        return response

    async def agent(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        if path == "s503":
            return web.json_response({"error": {"code": "x"}}, status=503)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"event: token\ndata: a\n\nevent: token\ndata: b\n\n")
        if path == "ok":
            await response.write(b'event: done\ndata: {"events": 2}\n\n')
        elif path == "short":
            await response.write(b'event: done\ndata: {"events": 5}\n\n')
        elif path == "error":
            await response.write(b'event: error\ndata: {"code": "upstream_reset"}\n\n')
        elif path == "abort":
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write_eof()
        return response


@pytest.fixture
async def fake_gateway(aiohttp_server: AiohttpServer) -> AsyncIterator[TestServer]:
    server = await aiohttp_server(FakeGateway().app)
    yield server


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("ok", None),
        ("nodone", "truncated"),
        ("short", "truncated"),
        ("error", "stream_error"),
        ("s503", "status_503"),
        ("abort", "truncated"),
    ],
)
async def test_stream_outcomes_are_classified(
    fake_gateway: TestServer, path: str, error: str | None
) -> None:
    config = LoadConfig(
        url=str(fake_gateway.make_url("/")),
        app="t",
        concurrency=2,
        duration=10,
        max_requests=8,
        mix={"stream": 1.0},
        agent_path=path,
        grace=2,
    )
    recorder = await run_load(config)
    report = build_report(recorder, config, Thresholds())
    assert_consistent(report)
    streams = report["kinds"]["stream"]["count"]
    assert streams == 8 - 2  # the cap, less one create per user
    if error is None:
        assert report["errors"] == 0
        assert report["stream"]["completion_ratio"] == 1.0
    else:
        assert report["errors_by_kind"] == {error: streams}
        assert report["stream"]["completed"] == 0
        assert report["passed"] is False
        assert any("no stream completed" in v for v in report["thresholds"]["violations"])


async def test_lost_writes_are_counted_stale(aiohttp_server: AiohttpServer) -> None:
    server = await aiohttp_server(FakeGateway(drop_writes=True).app)
    config = LoadConfig(
        url=str(server.make_url("/")),
        app="t",
        concurrency=1,
        duration=10,
        max_requests=3,  # create, write (dropped), and whatever comes next
        mix={"write": 1.0},
        grace=2,
    )
    report = build_report(await run_load(config), config, Thresholds(max_lost_sessions=0))
    assert_consistent(report)
    # The write's own response looked right; the next look at the session showed it missing.
    assert report["sessions"]["stale"] >= 1
    assert report["passed"] is False


def test_timeline_and_hdr_round_trip(memory_gateway_url: str) -> None:
    """The JSON carries encoded HDR histograms that decode to the same counts."""
    from hdrh.histogram import HdrHistogram

    code, report, stderr = loadgen("--url", memory_gateway_url, "-c", "2", "-n", "20")
    assert code == 0, stderr
    for row in report["kinds"].values():
        if row["ok"]:
            decoded: Any = HdrHistogram.decode(row["hdr"])
            assert decoded.get_total_count() == row["ok"]


def test_free_port_never_hands_out_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may bind port 0 to the port it gave the socket just closed (seen:
    `scripts/cluster` started Redis and nginx on one port): free_port skips a port it has
    handed out already."""
    from app.loadkit import ports

    given = iter([41000, 41000, 41000, 41001, 41000, 41002])

    class Bound:
        def __init__(self, *args: object) -> None:
            self.port = next(given)

        def __enter__(self) -> Bound:
            return self

        def __exit__(self, *args: object) -> None:
            pass

        def bind(self, address: tuple[str, int]) -> None:
            pass

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(ports, "_HANDED_OUT", set())
    monkeypatch.setattr(socket, "socket", Bound)
    assert [ports.free_port() for _ in range(3)] == [41000, 41001, 41002]
