"""Helpers for the resumable-run tests: a counting upstream and an SSE reader.

- `CountingUpstream`: `POST /v1/chat` streams `count` events `event: token` /
  `data: {"n": <i>}`, `burst` per write, writes `delay` seconds apart (its own `id: up-<i>`
  line on every event, to show upstream ids are kept), then `event: done`. `cancelled` is set
  when the gateway hung up on it, `finished` when it wrote its last byte.
- `read_events(response, limit)`: the framed events (bytes, `\\n\\n` excluded) read from a
  gateway response, up to `limit` (None: until the response ends).
- `event_id(event)` / `event_n(event)`: the gateway's id (the last `id:` line) and the
  upstream's counter of one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.config import Settings
from app.runs.sse import EventTooLarge, SseParser, frame
from app.runs.store import RedisRunStore
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import RedisOptions, make_client
from tests.fake_upstream import run_gateway
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer


@dataclass
class CountingUpstream:
    count: int = 40
    delay: float = 0.02
    burst: int = 1  # events per write (a burst reaches the gateway as one chunk)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    started: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat", self.chat)
        return app

    @staticmethod
    def event(i: int) -> bytes:
        return f"event: token\nid: up-{i}\ndata: {json.dumps({'n': i})}\n\n".encode()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.started += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for start in range(0, self.count, self.burst):
                end = min(start + self.burst, self.count)
                await response.write(b"".join(self.event(i) for i in range(start, end)))
                await asyncio.sleep(self.delay)
            await response.write(b"event: done\ndata: {}\n\n")
            await response.write_eof()
            self.finished.set()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        except ConnectionError:
            self.cancelled.set()
        return response


async def read_events(response: aiohttp.ClientResponse, limit: int | None = None) -> list[bytes]:
    events: list[bytes] = []
    buffer = b""
    while limit is None or len(events) < limit:
        chunk = await response.content.readany()
        if not chunk:
            break
        buffer += chunk
        *complete, buffer = buffer.split(b"\n\n")
        events.extend(e for e in complete if e and not e.startswith(b":"))
    return events if limit is None else events[:limit]


async def events_of_one_run(settings: Settings) -> list[bytes]:
    """The events a browser gets for one agent request to `shop` through a gateway served with
    `settings` (in process): 200 asserted, then every event to the response's end."""
    async with (
        run_gateway(settings) as gw,
        gw.client.post("/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}) as response,
    ):
        assert response.status == 200
        return await read_events(response)


def event_id(event: bytes) -> int:
    ids = [line[4:] for line in event.split(b"\n") if line.startswith(b"id: ")]
    return int(ids[-1])


def event_n(event: bytes) -> int | None:
    for line in event.split(b"\n"):
        if line.startswith(b"data: ") and b'"n"' in line:
            value = json.loads(line[6:])["n"]
            assert isinstance(value, int)
            return value
    return None


def event_kind(event: bytes) -> str:
    for line in event.split(b"\n"):
        if line.startswith(b"event: "):
            return line[7:].decode()
    return "message"


def error_code(event: bytes) -> str | None:
    if event_kind(event) != "error":
        return None
    for line in event.split(b"\n"):
        if line.startswith(b"data: "):
            code = json.loads(line[6:])["code"]
            assert isinstance(code, str)
            return code
    return None


async def close_quietly(response: aiohttp.ClientResponse) -> None:
    """Drop a streaming response's connection (the browser leaves)."""
    response.close()
    with contextlib.suppress(Exception):
        await asyncio.sleep(0)


CSRF = {"X-CSRF": "1"}


async def start_upstreams(stack: AsyncExitStack, *apps: web.Application) -> list[str]:
    """Serve each of `apps` on loopback until `stack` closes; their `/v1` base URLs."""
    urls = []
    for upstream_app in apps:
        server = TestServer(upstream_app, host="127.0.0.1")
        await server.start_server()
        stack.push_async_callback(server.close)
        urls.append(str(server.make_url("/v1")))
    return urls


def redis_runs_env(tmp_path: Path, redis_url: str, apps_toml: str) -> dict[str, str]:
    """A gateway process's environment: sessions and runs in Redis at `redis_url`, the
    applications of `apps_toml`, a short heartbeat."""
    apps = tmp_path / "apps.toml"
    apps.write_text(apps_toml)
    return {
        "SESSION_STORE": "redis",
        "REDIS_URL": redis_url,
        "APPS_FILE": str(apps),
        "RUN_HEARTBEAT_SECONDS": "0.25",
    }


class SseUpstream:
    """An agent upstream whose `POST /v1/chat` answers an event stream: what `write_events`
    writes (subclasses), then its end."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await self.write_events(response)
        await response.write_eof()
        return response

    async def write_events(self, response: web.StreamResponse) -> None:
        raise NotImplementedError


# The cut-run attacks (tests/test_runs_budget_attacks9.py, 10, 11): an application `shop` of a
# small Redis budget fed ~8 KB events, resumed and stopped on either of two gateways.
PADDED_EVENT_PAD = 8000
SHOP_BUDGET = 256 * 1024


class PaddedUpstream(SseUpstream):
    """`count` events `event: token` / `data: {"n": i, "pad": ...}` of ~8 KB, `delay` apart
    (one write each), then `event: done`. `cancelled`: the gateway hung up on it;
    `finished`: it wrote everything."""

    def __init__(self, delay: float = 0.01, count: int = 80) -> None:
        self.delay = delay
        self.count = count
        self.cancelled = asyncio.Event()
        self.finished = asyncio.Event()

    async def write_events(self, response: web.StreamResponse) -> None:
        try:
            for i in range(self.count):
                payload = json.dumps({"n": i, "pad": "p" * PADDED_EVENT_PAD})
                await response.write(f"event: token\ndata: {payload}\n\n".encode())
                await asyncio.sleep(self.delay)
            await response.write(b"event: done\ndata: {}\n\n")
            self.finished.set()
        except (asyncio.CancelledError, ConnectionError):
            self.cancelled.set()
            raise


def shop_env(
    tmp_path: Path, redis: RedisServer, upstream: str, window: float = 30, budget: int = SHOP_BUDGET
) -> dict[str, str]:
    """A gateway process's environment (`redis_runs_env`) with one resumable application
    `shop` of `upstream`, its window and Redis budget."""
    return redis_runs_env(
        tmp_path,
        redis.url,
        f'[apps.shop]\nupstream = "{upstream}"\nresumable = true\n'
        f"resume_window_seconds = {window}\nresume_redis_budget_bytes = {budget}\n",
    )


async def resume_shop_run(
    http: aiohttp.ClientSession, url: str, run_id: str, after: int
) -> tuple[int, list[bytes], str]:
    """A resume of `shop`'s run `run_id` on `url` after `after`: (status, events, body when
    not an event stream)."""
    async with http.get(
        f"{url}/apps/shop/runs/{run_id}", headers={"Last-Event-ID": str(after)}
    ) as response:
        if response.content_type != "text/event-stream":
            return response.status, [], (await response.read()).decode(errors="replace")
        events = await asyncio.wait_for(read_events(response), 20)
        return response.status, events, ""


async def stop_shop_run(http: aiohttp.ClientSession, url: str, run_id: str) -> tuple[int, str]:
    """`stop` of `shop`'s run `run_id` on `url`: (status, body)."""
    async with http.post(f"{url}/apps/shop/runs/{run_id}/stop", headers=CSRF) as stopped:
        return stopped.status, await stopped.text()


@asynccontextmanager
async def two_shop_gateways(
    tmp_path: Path,
    redis: RedisServer,
    upstream: SseUpstream,
    window: float = 30,
    budget: int = SHOP_BUDGET,
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess, aiohttp.ClientSession]]:
    """Two gateway processes A and B (`shop_env`) on `redis` in front of `upstream`, and one
    browser for both (a client session with its cookie jar). On the way out the session
    closes, then the processes stop (SIGTERM: they flush their budget counts), then the
    upstream."""
    async with AsyncExitStack() as stack:
        (upstream_url,) = await start_upstreams(stack, upstream.app())
        env = shop_env(tmp_path, redis, upstream_url, window, budget)
        with ExitStack() as processes:
            a, b = (processes.enter_context(GatewayProcess(env)) for _ in range(2))
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                yield a, b, http


@asynccontextmanager
async def run_stores(redis: RedisServer, count: int) -> AsyncIterator[list[RedisRunStore]]:
    """`count` run stores (key prefix `t:`) on `redis`, each its own replica (its own client
    and replica token): the budget scripts of several replicas, without gateways."""
    backends = [RedisBackend(make_client(RedisOptions(url=redis.url))) for _ in range(count)]
    try:
        yield [RedisRunStore(backend, backend, "t:") for backend in backends]
    finally:
        for backend in backends:
            await backend.close()


# The budget keys of `run_stores`' application `shop` (key prefix `t:`).
STORES_FLIGHT_KEY = "t:runs:{shop}:flight"


def flight_fields(redis: RedisServer) -> dict[bytes, bytes]:
    """`shop`'s runs in flight hash (`run_stores`): replica fields, `:t`, `:d`, `:s`."""
    return cast(dict[bytes, bytes], redis.client().hgetall(STORES_FLIGHT_KEY))


def replica_field(redis: RedisServer, store: RedisRunStore) -> int:
    """`store`'s (one replica's) published runs in flight in `shop`'s hash (0: none)."""
    return int(flight_fields(redis).get(store.replica.encode(), b"0"))


async def at_slot_offset(window_ms: int, offset_ms: int) -> int:
    """Sleep until `offset_ms` into a budget slot of `window_ms` (the stores' own clock,
    `RedisRunStore._budget_keys`), at least 50 ms ahead; that slot's number."""
    now = time.time() * 1000
    slot, into = divmod(now, window_ms)
    wait = offset_ms - into
    if wait < 50:
        wait += window_ms
        slot += 1
    await asyncio.sleep(wait / 1000)
    return int(slot)


async def until_slot(window_ms: int, slot: int, offset_ms: int) -> None:
    """Sleep until `offset_ms` into slot `slot`."""
    wait = slot * window_ms + offset_ms - time.time() * 1000
    if wait > 0:
        await asyncio.sleep(wait / 1000)
    assert int(time.time() * 1000) // window_ms == slot, "slept past the slot"


def run_keys_bytes(redis: RedisServer, app_id: str) -> tuple[int, int]:
    """(runs of `app_id` in Redis, bytes their keys take: `MEMORY USAGE ... SAMPLES 0`)."""
    client = redis.client()
    runs = 0
    total = 0
    for meta in client.scan_iter(match=b"*run:{*}:m", count=1000):
        if client.hget(meta, "a") != app_id.encode():
            continue
        runs += 1
        for kind in (b"m", b"e", b"h", b"r"):
            key = meta[:-1] + kind
            total += int(client.memory_usage(key, samples=0) or 0)
    return runs, total


def budget_counted(redis: RedisServer, app_id: str) -> int:
    """What `app_id`'s budget counters hold (all slots)."""
    client = redis.client()
    return sum(
        int(client.get(key) or 0)
        for key in client.scan_iter(match=f"*runs:{{{app_id}}}:bytes:*".encode(), count=1000)
    )


async def flood_runs(
    url: str,
    runs: int,
    *,
    sessions: int = 8,
    per_session: int = 8,
    message: str = "hi",
    strict: bool = True,
) -> int:
    """`runs` agent requests of `shop` (`sessions` cookie jars, `per_session` at once each);
    how many came back resumable (`X-Run-Id`). `strict`: each must answer 200."""
    resumable = 0
    left = runs

    async def one_session() -> None:
        nonlocal resumable, left
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
            # A first request so the session cookie exists before the concurrent ones.
            async def one() -> None:
                nonlocal resumable
                async with client.post(
                    f"{url}/apps/shop/agent/chat", headers=CSRF, json={"message": message}
                ) as response:
                    assert response.status == 200 or not strict, response.status
                    resumable += "X-Run-Id" in response.headers
                    await response.read()

            left -= 1
            await one()

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await one()

            await asyncio.gather(*(worker() for _ in range(per_session)))

    await asyncio.gather(*(one_session() for _ in range(sessions)))
    return resumable


@contextlib.contextmanager
def redis_at(maxmemory: str, policy: str) -> Iterator[RedisServer]:
    """A redis-server of its own at `maxmemory` with `policy`."""
    with RedisServer(extra_args=["--maxmemory", maxmemory, "--maxmemory-policy", policy]) as server:
        yield server


async def other_users(url: str, until: float, counts: dict[tuple[int, bool], int]) -> None:
    """New users of application `other` (a new cookie jar each), one every 50 ms from 0.5 s
    on until `until` (monotonic): `counts` by (status, resumable)."""
    await asyncio.sleep(0.5)
    while time.monotonic() < until:
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as user,
            user.post(f"{url}/apps/other/agent/chat", headers=CSRF, json={"message": "hi"}) as r,
        ):
            await r.read()
            key = (r.status, "X-Run-Id" in r.headers)
            counts[key] = counts.get(key, 0) + 1
        await asyncio.sleep(0.05)


class OneBigEventUpstream(SseUpstream):
    """One event of `size` bytes of data at once (by default ~4.1 MB, within the default
    `resume_max_bytes`, 4 MiB), then the end: a run whose last stream entry is that event."""

    def __init__(self, size: int = 4_100_000, fill: bytes = b"b") -> None:
        self.size = size
        self.fill = fill

    async def write_events(self, response: web.StreamResponse) -> None:
        await response.write(b"data: " + self.fill * self.size + b"\n\n")


async def runs_back_to_back(url: str, until: float, kept: list[bool]) -> None:
    """One client (its own session) starting `shop` runs one after the other until `until`;
    `kept` gets whether each was resumable."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        while time.monotonic() < until:
            async with client.post(
                f"{url}/apps/shop/agent/chat", headers=CSRF, json={"message": "hi"}
            ) as response:
                await response.read()
                assert response.status == 200, response.status
                kept.append("X-Run-Id" in response.headers)


async def start_run_of(
    http: aiohttp.ClientSession,
    url: str,
    app_id: str,
    *,
    address: str | None = None,
    message: str = "x",
) -> str:
    """A run of `app_id` read to its end by `http`'s session (from `address` behind the
    trusted proxy, when given); its id."""
    headers = dict(CSRF) if address is None else {**CSRF, "X-Forwarded-For": address}
    async with http.post(
        f"{url}/apps/{app_id}/agent/chat", headers=headers, json={"message": message}
    ) as response:
        await response.read()
        assert response.status == 200, response.status
        return response.headers["X-Run-Id"]


async def replay(
    http: aiohttp.ClientSession,
    url: str,
    app_id: str,
    run_id: str,
    *,
    address: str | None = None,
) -> tuple[float, bytes]:
    """One replay of `run_id` from its start (200 asserted): (seconds it took, its body)."""
    headers = {"Last-Event-ID": "0"}
    if address is not None:
        headers["X-Forwarded-For"] = address
    began = time.monotonic()
    async with http.get(f"{url}/apps/{app_id}/runs/{run_id}", headers=headers) as response:
        body = await asyncio.wait_for(response.read(), 40)
        assert response.status == 200, response.status
    return time.monotonic() - began, body


async def replay_whole(
    http: aiohttp.ClientSession,
    url: str,
    app_id: str,
    run_id: str,
    *,
    address: str | None = None,
    events: int = 12,
) -> float:
    """Seconds one whole replay of `run_id` (`events` events, no error) takes."""
    took, body = await replay(http, url, app_id, run_id, address=address)
    assert b"event: error" not in body, body[-300:]
    assert body.count(b"\n\n") == events, body.count(b"\n\n")
    return took


class BySizeUpstream(SseUpstream):
    """A request whose message is `big` gets one 4.1 MB event (one stream entry); any other
    12 events of 300 KB (12 entries, each over `CATCHUP_BYTES`)."""

    big = False

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.big = (await request.json()).get("message") == "big"
        return await super().chat(request)

    async def write_events(self, response: web.StreamResponse) -> None:
        if self.big:
            await response.write(b"data: " + b"b" * 4_100_000 + b"\n\n")
            return
        for i in range(12):
            await response.write(f"data: {i} ".encode() + b"s" * 300_000 + b"\n\n")
            await asyncio.sleep(0.005)


WHOLE_EVENTS = 5


class WholeUpstream:
    """An agent whose whole answer goes out in one write with its length: it has all arrived
    when the gateway's run starts (`RunRegistry.start_ended`). `tail`: bytes after the last
    event (an unfinished event: the pump's way)."""

    def __init__(self, *, tail: bytes = b"", delay: float = 0.0) -> None:
        self.tail = tail
        self.delay = delay

    def body(self) -> bytes:
        events = b"".join(CountingUpstream.event(i) for i in range(WHOLE_EVENTS))
        return events + b"event: done\ndata: {}\n\n" + self.tail

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if not self.delay:
            return web.Response(body=self.body(), content_type="text/event-stream")
        # The same answer, event by event: the run is pumped (the way before).
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in self.body().split(b"\n\n")[:-1]:
            await response.write(event + b"\n\n")
            await asyncio.sleep(self.delay)
        await response.write_eof()
        return response


def framed_by_the_parser(stream: bytes, max_held: int) -> tuple[bytes, int] | None:
    """The general way to frame a whole stream, the oracle of `frame_whole` and
    `frame_stream`: the HTML-standard parser (its line loop, no shortcut), then `frame` for
    each event from 1; None when the last event is unfinished or one is over `max_held`."""
    parser = SseParser(shortcut=False, max_held=max_held)
    try:
        events = parser.feed(stream)
    except EventTooLarge:
        return None
    if parser.mid_event:
        return None
    return b"".join(frame(seq, event) for seq, event in enumerate(events, 1)), len(events)
