"""End to end on the replicated topology: `scripts/cluster` starts Redis (AOF on), three
`python -m app` replicas and nginx (deploy/nginx.conf) on loopback.

- A session created through the load balancer is the same session on every replica, reached
  through nginx or on each replica's own port.
- A rolling restart (SIGTERM each replica in turn, start it again) under a steady load of
  session writes and reads from several clients fails no request and loses no session.
- A replica killed with SIGKILL under load loses no session; only requests in flight on it
  may fail (non-idempotent ones: nginx retries the others on another replica).

Every duration is configurable through the environment (`E2E_*`, see below), so a slow
machine can stretch them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.loadkit.ports import free_port
from tests.fake_upstream import FakeUpstream, sse, sse_events, start_sse
from tests.gateway_process import REPO_ROOT

pytestmark = pytest.mark.redis_server


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


CLUSTER_TIMEOUT = _env_float("E2E_CLUSTER_TIMEOUT_SECONDS", 30)
REQUEST_TIMEOUT = _env_float("E2E_REQUEST_TIMEOUT_SECONDS", 10)
WARMUP = _env_float("E2E_WARMUP_SECONDS", 1.0)
SETTLE = _env_float("E2E_SETTLE_SECONDS", 1.0)
CLIENT_PAUSE = _env_float("E2E_CLIENT_PAUSE_SECONDS", 0.002)
CLIENTS = int(os.environ.get("E2E_CLIENTS", "6"))
# A client starts a new session every this many writes, so sessions are created during the
# restarts too.
WRITES_PER_SESSION = int(os.environ.get("E2E_WRITES_PER_SESSION", "40"))
# Rolling restarts in a row (raise it to soak: E2E_ROLLING_ROUNDS=6).
ROLLING_ROUNDS = int(os.environ.get("E2E_ROLLING_ROUNDS", "1"))
# How long after a SIGKILL a failed request still counts as "in flight on the killed replica".
KILL_WINDOW = _env_float("E2E_KILL_WINDOW_SECONDS", 2.0)

REPLICAS = 3
APP = "demo"
COOKIE = "agent_sid"
CSRF = {"X-CSRF": "1"}

# The gateways' configuration: short enough for a test, the production shape otherwise.
GATEWAY_ENV = {
    "SHUTDOWN_TIMEOUT_SECONDS": os.environ.get("E2E_SHUTDOWN_TIMEOUT_SECONDS", "10"),
    "SHUTDOWN_IDLE_GRACE_SECONDS": os.environ.get("E2E_SHUTDOWN_IDLE_GRACE_SECONDS", "5"),
    "LOG_LEVEL": "info",
    "UVLOOP": "1",
}


# -- the topology ---------------------------------------------------------------------------


class Cluster:
    """`scripts/cluster` in a private directory, driven as a person would drive it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.state: dict[str, Any] = {}
        self.env = dict(GATEWAY_ENV)
        self.upstream_port = 0

    def run(self, *args: str, timeout: float = CLUSTER_TIMEOUT * 3) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SESSION_", "REDIS_"))}
        env.pop("APPS_FILE", None)
        env.update(self.env)
        argv = [sys.executable, str(REPO_ROOT / "scripts" / "cluster.py"), "--dir", str(self.dir)]
        argv += ["--timeout", str(CLUSTER_TIMEOUT), "--grace", str(CLUSTER_TIMEOUT), *args]
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise AssertionError(
                f"scripts/cluster {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}\n{self.logs()}"
            )
        self.reload()
        return done.stdout

    def reload(self) -> None:
        self.state = json.loads((self.dir / "state.json").read_text())

    def logs(self, lines: int = 20) -> str:
        out = []
        for path in sorted(self.dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)

    @property
    def url(self) -> str:
        url: str = self.state["url"]
        return url

    def replica_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.state['replicas'][index]['port']}"

    def replica_pid(self, index: int) -> int:
        pid: int = self.state["replicas"][index]["proc"]["pid"]
        return pid


@pytest.fixture
def cluster(tier_system: None, tmp_path: Path) -> Iterator[Cluster]:
    topology = Cluster(tmp_path / "cluster")
    workdir = tmp_path / "work"  # no stray .env is read by the gateways
    workdir.mkdir()
    # Application `shop` proxies to an upstream the test may serve on `upstream_port`.
    topology.upstream_port = free_port()
    apps = workdir / "apps.toml"
    apps.write_text(
        '[apps.demo]\nupstream = "builtin:demo"\n\n'
        f'[apps.shop]\nupstream = "http://127.0.0.1:{topology.upstream_port}/v1"\n'
    )
    topology.env["APPS_FILE"] = str(apps)
    topology.run(
        "up", "--replicas", str(REPLICAS), "--port", "0", "--workdir", str(workdir), "--quiet"
    )
    try:
        yield topology
    finally:
        topology.run("down")


# -- a steady load of session writes and reads ----------------------------------------------


@dataclass
class Failure:
    at: float
    client: int
    method: str
    detail: str


@dataclass
class Load:
    """`clients` concurrent browsers, each writing then reading its session in a loop and
    starting a new session every `WRITES_PER_SESSION` writes. Every answer is checked: a
    write must echo the merged data, a read must see the last acknowledged write."""

    base_url: str
    clients: int = CLIENTS
    ok: int = 0
    failures: list[Failure] = field(default_factory=list)
    # session id -> the values its `n` may hold (one when every write was acknowledged; two
    # while a failed write may or may not have been applied).
    sessions: dict[str, set[int]] = field(default_factory=dict)
    ok_times: list[float] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def fail(self, client: int, method: str, detail: str) -> None:
        self.failures.append(Failure(time.monotonic(), client, method, detail))

    def succeed(self) -> None:
        self.ok += 1
        self.ok_times.append(time.monotonic())

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await asyncio.gather(*(self._client(http, c) for c in range(self.clients)))

    def stop(self) -> None:
        self._stop.set()

    async def _client(self, http: aiohttp.ClientSession, client: int) -> None:
        session_id: str | None = None
        writes = 0
        n = 0
        while not self._stop.is_set():
            if session_id is None or writes >= WRITES_PER_SESSION:
                session_id, writes = None, 0
            n += 1
            session_id = await self._write(http, client, session_id, n)
            writes += 1
            if session_id is not None:
                await self._read(http, client, session_id)
            await asyncio.sleep(CLIENT_PAUSE)

    async def _write(
        self, http: aiohttp.ClientSession, client: int, session_id: str | None, n: int
    ) -> str | None:
        body = {"n": n, "client": client}
        cookies = {COOKIE: session_id} if session_id else None
        try:
            async with http.patch(
                f"{self.base_url}/apps/{APP}/session", json=body, headers=CSRF, cookies=cookies
            ) as response:
                data = await _json(response)
                if response.status != 200 or data != {"data": body}:
                    raise AssertionError(f"{response.status} {data}")
                if session_id is None:
                    session_id = response.cookies[COOKIE].value
            self.sessions[session_id] = {n}
            self.succeed()
        except (aiohttp.ClientError, TimeoutError, AssertionError, KeyError, ValueError) as err:
            self.fail(client, "PATCH", f"{type(err).__name__}: {err}")
            if session_id is not None:
                self.sessions[session_id].add(n)  # applied or not: both are acceptable
        return session_id

    async def _read(self, http: aiohttp.ClientSession, client: int, session_id: str) -> None:
        try:
            async with http.get(
                f"{self.base_url}/apps/{APP}/session", cookies={COOKIE: session_id}
            ) as response:
                data = await _json(response)
                if response.status != 200:
                    raise AssertionError(f"{response.status} {data}")
            seen = data["data"].get("n")
            if seen not in self.sessions[session_id]:
                raise AssertionError(f"read n={seen}, expected one of {self.sessions[session_id]}")
            self.sessions[session_id] = {seen}
            self.succeed()
        except (aiohttp.ClientError, TimeoutError, AssertionError, KeyError, ValueError) as err:
            self.fail(client, "GET", f"{type(err).__name__}: {err}")

    def successes_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.ok_times if start <= t <= end)


async def _json(response: aiohttp.ClientResponse) -> Any:
    """The JSON body; anything else (nginx's HTML error pages) fails with status and text."""
    text = await response.text()
    try:
        return json.loads(text)
    except ValueError:
        raise AssertionError(f"{response.status} {text[:120]!r}") from None


async def read_n(base_url: str, session_id: str) -> Any:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(f"{base_url}/apps/{APP}/session", cookies={COOKIE: session_id}) as response,
    ):
        assert response.status == 200, await response.text()
        data: dict[str, Any] = await response.json()
        return data["data"].get("n")


async def assert_sessions_everywhere(cluster: Cluster, load: Load) -> None:
    """Every session the load created holds its last value, through nginx and on each replica."""
    assert load.sessions, "the load created no session"
    urls = [cluster.url] + [cluster.replica_url(i) for i in range(REPLICAS)]
    lost: list[str] = []
    for session_id, expected in load.sessions.items():
        for url in urls:
            seen = await read_n(url, session_id)
            if seen not in expected:
                lost.append(f"{session_id[:8]}… on {url}: n={seen}, expected {expected}")
    assert not lost, f"{len(lost)} lost or stale session reads:\n" + "\n".join(lost[:20])


async def run_cluster(cluster: Cluster, *args: str) -> float:
    """Run a `scripts/cluster` command off the event loop; returns when it finished."""
    await asyncio.to_thread(cluster.run, *args)
    return time.monotonic()


# -- tests ----------------------------------------------------------------------------------


async def test_a_session_created_through_the_lb_is_the_same_on_every_replica(
    cluster: Cluster,
) -> None:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        lb_origin = {"Origin": cluster.url}
        async with http.patch(
            f"{cluster.url}/apps/{APP}/session",
            json={"cart": ["book"], "step": 2},
            headers=CSRF | lb_origin,
        ) as response:
            # The Origin is the LB's own: accepted only because the gateway believes nginx's
            # X-Forwarded-Host (TRUSTED_PROXIES=127.0.0.1).
            assert response.status == 200, await response.text()
            morsel = response.cookies[COOKIE]
            session_id = morsel.value
            assert morsel["path"] == f"/apps/{APP}"
            assert morsel["httponly"]
        bodies = set()
        for url in [cluster.url] * REPLICAS + [cluster.replica_url(i) for i in range(REPLICAS)]:
            async with http.get(
                f"{url}/apps/{APP}/session", cookies={COOKIE: session_id}
            ) as response:
                assert response.status == 200
                bodies.add(await response.text())
        assert bodies == {json.dumps({"data": {"cart": ["book"], "step": 2}})}
        # Written on one replica, updated through another, read on the third.
        async with http.patch(
            f"{cluster.replica_url(1)}/apps/{APP}/session",
            json={"step": 3},
            headers=CSRF,
            cookies={COOKIE: session_id},
        ) as response:
            assert response.status == 200
        for index in (0, 2):
            async with http.get(
                f"{cluster.replica_url(index)}/apps/{APP}/session", cookies={COOKIE: session_id}
            ) as response:
                assert await response.json() == {"data": {"cart": ["book"], "step": 3}}
        # /metrics is scraped on each replica, never published through the LB.
        async with http.get(f"{cluster.url}/metrics") as response:
            assert response.status == 404
        async with http.get(f"{cluster.replica_url(2)}/metrics") as response:
            assert response.status == 200
            assert "agent_bff_http_requests_total" in await response.text()
        # Straight to a replica, the LB's origin is a foreign one: the trust is nginx's alone.
        async with http.patch(
            f"{cluster.replica_url(0)}/apps/{APP}/session",
            json={"step": 4},
            headers=CSRF | lb_origin,
            cookies={COOKIE: session_id},
        ) as response:
            assert response.status == 403


@pytest.mark.serial
async def test_rolling_restart_under_load_fails_nothing_and_loses_no_session(
    cluster: Cluster,
) -> None:
    load = Load(cluster.url)
    runner = asyncio.create_task(load.run())
    windows: list[tuple[float, float]] = []
    try:
        await asyncio.sleep(WARMUP)
        for _ in range(ROLLING_ROUNDS):
            for index in range(REPLICAS):
                old_pid = cluster.replica_pid(index)
                started = time.monotonic()
                finished = await run_cluster(cluster, "restart", str(index))
                windows.append((started, finished))
                assert cluster.replica_pid(index) != old_pid
                await asyncio.sleep(SETTLE)
    finally:
        load.stop()
        await runner
    print(
        f"rolling restart: {len(windows)} restarts "
        f"({', '.join(f'{end - start:.1f}s' for start, end in windows)}), "
        f"{load.ok} requests ok, {len(load.failures)} failed, {len(load.sessions)} sessions"
    )
    assert not load.failures, (
        f"{len(load.failures)} failed requests of {load.ok + len(load.failures)}:\n"
        + "\n".join(f"{f.method} {f.detail}" for f in load.failures[:20])
        + f"\n{cluster.logs()}"
    )
    # The load really ran through every restart.
    for start, end in windows:
        assert load.successes_between(start, end) > 0
    assert load.ok > 100
    await assert_sessions_everywhere(cluster, load)


async def test_a_replica_killed_under_load_loses_no_session(cluster: Cluster) -> None:
    load = Load(cluster.url)
    runner = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(WARMUP)
        victim = 1
        killed_at = time.monotonic()
        await run_cluster(cluster, "stop", str(victim), "--kill")
        await asyncio.sleep(SETTLE)
        recovered_at = time.monotonic()
        await asyncio.sleep(SETTLE)
        await run_cluster(cluster, "start", str(victim))
        await asyncio.sleep(SETTLE)
    finally:
        load.stop()
        await runner
    print(
        f"SIGKILL under load: {len(load.failures)} failed "
        f"({', '.join(sorted({f.method for f in load.failures})) or '-'}), "
        f"{load.ok} requests ok, {len(load.sessions)} sessions"
    )
    # Only requests in flight on the killed replica may fail: at most one per client, right
    # at the kill, and only writes (nginx retries an idempotent GET on another replica).
    assert len(load.failures) <= load.clients, load.failures
    for failure in load.failures:
        assert failure.method == "PATCH", failure
        assert killed_at - 0.5 <= failure.at <= killed_at + KILL_WINDOW, failure
    # Service went on without the killed replica.
    assert load.successes_between(recovered_at, recovered_at + SETTLE) > 0
    await assert_sessions_everywhere(cluster, load)


async def test_streams_pass_through_nginx_unbuffered(cluster: Cluster) -> None:
    """The first event reaches the browser while the upstream still holds the stream open:
    with nginx buffering the response this test would wait until the timeout."""
    upstream = FakeUpstream()
    release = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse("token", {"text": "first"}))
        await release.wait()
        await response.write(sse("done", {}))
        return response

    upstream.on("/v1/chat", stream)
    server = TestServer(upstream.app, host="127.0.0.1", port=cluster.upstream_port)
    await server.start_server()
    try:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.post(f"{cluster.url}/apps/shop/agent/chat", json={}, headers=CSRF) as response,
        ):
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            first = await response.content.readuntil(b"\n\n")
            assert sse_events(first.decode()) == [("token", '{"text": "first"}')]
            release.set()
            rest = await response.content.read()
        assert sse_events(rest.decode()) == [("done", "{}")]
    finally:
        release.set()
        await server.close()
