"""An upstream agent stub for load tests: deterministic SSE and JSON, so a load test measures
the gateway, not a model.

Routes (the last path segment decides, so any upstream base path works, e.g.
`upstream = "http://127.0.0.1:9000/base"` and the gateway's `/apps/demo/agent/stream`):
- `*/stream` and `*/chat` (any method; `chat` is loadgen's default `--agent-path`, the
  built-in demo agent's path): `text/event-stream` with `events` events, each
  `id: <i>` / `event: token` / `data: <size bytes>`, a pause of `pause_ms` between events and
  `first_ms` before the first, then `event: done` with `data: {"events": <n>}` so a client can
  tell a complete stream from a truncated one. Query parameters override the defaults:
  `?events=50&size=200&pause_ms=0&first_ms=0`. With `stamp=1` each data line begins
  `<index> <CLOCK_MONOTONIC ns at the write> ` (same size), so a client on this machine can
  measure each event's delivery time (`loadkit.concurrency`).
- `*/json`: `{"ok": true, "thread_id": ..., "application_id": ...}` (what the gateway sent).
- `/healthz`: `{"status": "ok"}`.
The request body is read and discarded.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import ipaddress
import sys
import time
from dataclasses import dataclass, replace

from aiohttp import web

from app.loadkit.loops import loop_factory

MAX_EVENTS = 100_000
MAX_SIZE = 1_048_576


@dataclass(frozen=True, slots=True)
class StreamShape:
    events: int = 50
    size: int = 200
    pause_ms: float = 0.0
    first_ms: float = 0.0
    stamp: bool = False


STUB_SHAPE_KEY = web.AppKey("stub_shape", StreamShape)


@functools.lru_cache(maxsize=64)
def event_bytes(index: int, size: int) -> bytes:
    """Event `index` with a data line of exactly `size` bytes (deterministic content)."""
    head = f"{index:06d} "
    body = (head + "abcdefghijklmnopqrstuvwxyz" * (size // 26 + 1))[:size] if size else ""
    return f"id: {index}\nevent: token\ndata: {body}\n\n".encode("ascii")


def stamped_event_bytes(index: int, size: int) -> bytes:
    """Event `index` whose data line starts with `<index> <time.monotonic_ns()> ` (padded to
    `size` bytes when that is longer): the moment the stub wrote it, comparable across the
    processes of one Linux machine (CLOCK_MONOTONIC)."""
    head = f"{index:06d} {time.monotonic_ns()} "
    body = head + "x" * (size - len(head)) if size > len(head) else head
    return f"id: {index}\nevent: token\ndata: {body}\n\n".encode("ascii")


def done_bytes(events: int) -> bytes:
    return f'event: done\ndata: {{"events": {events}}}\n\n'.encode("ascii")


def shape_from_query(request: web.Request, default: StreamShape) -> StreamShape:
    def number(name: str, current: float, limit: float) -> float:
        raw = request.query.get(name)
        if raw is None:
            return current
        try:
            value = float(raw)
        except ValueError as err:
            raise web.HTTPBadRequest(text=f"{name} must be a number") from err
        if not 0 <= value <= limit:
            raise web.HTTPBadRequest(text=f"{name} must be between 0 and {limit:g}")
        return value

    return replace(
        default,
        events=int(number("events", default.events, MAX_EVENTS)),
        size=int(number("size", default.size, MAX_SIZE)),
        pause_ms=number("pause_ms", default.pause_ms, 60_000),
        first_ms=number("first_ms", default.first_ms, 60_000),
        stamp=request.query.get("stamp", "1" if default.stamp else "0") == "1",
    )


async def stream(request: web.Request) -> web.StreamResponse:
    shape = shape_from_query(request, request.app[STUB_SHAPE_KEY])
    await request.read()
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    if shape.first_ms:
        await asyncio.sleep(shape.first_ms / 1000)
    render = stamped_event_bytes if shape.stamp else event_bytes
    for i in range(shape.events):
        if i and shape.pause_ms:
            await asyncio.sleep(shape.pause_ms / 1000)
        await response.write(render(i, shape.size))
    await response.write(done_bytes(shape.events))
    await response.write_eof()
    return response


async def json_reply(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response(
        {
            "ok": True,
            "thread_id": request.headers.get("X-Agent-Thread-Id"),
            "application_id": request.headers.get("X-Application-Id"),
        }
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def dispatch(request: web.Request) -> web.StreamResponse:
    last = request.path.rstrip("/").rsplit("/", 1)[-1]
    if last in ("stream", "chat"):
        return await stream(request)
    if last == "json":
        return await json_reply(request)
    if request.path == "/healthz":
        return await healthz(request)
    raise web.HTTPNotFound(text="stub routes: */stream, */chat, */json, /healthz")


def create_stub(shape: StreamShape | None = None) -> web.Application:
    app = web.Application()
    app[STUB_SHAPE_KEY] = shape or StreamShape()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="A deterministic SSE upstream agent for load tests (see module docstring).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port (0: any free port)")
    parser.add_argument("--events", type=int, default=50, help="events per stream (50)")
    parser.add_argument("--size", type=int, default=200, help="bytes of data per event (200)")
    parser.add_argument("--pause-ms", type=float, default=0.0, help="pause between events")
    parser.add_argument("--first-ms", type=float, default=0.0, help="pause before the first")
    parser.add_argument(
        "--stamp", action="store_true", help="stamp each event with its write time (ns)"
    )
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow binding a non-loopback address"
    )
    args = parser.parse_args(argv)
    if not _is_loopback(args.host) and not args.allow_remote:
        parser.error(f"--host {args.host} is not a loopback address; add --allow-remote")
    if not (0 <= args.events <= MAX_EVENTS and 0 <= args.size <= MAX_SIZE):
        parser.error(f"--events must be 0..{MAX_EVENTS} and --size 0..{MAX_SIZE}")
    shape = StreamShape(args.events, args.size, args.pause_ms, args.first_ms, args.stamp)
    return run(create_stub(shape), args.host, args.port)


def run(app: web.Application, host: str, port: int) -> int:
    """Serve until SIGINT/SIGTERM; prints `listening on http://host:port` once bound."""

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=True)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        print(f"upstream_stub listening on http://{host}:{bound}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        new_loop = loop_factory()
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(serve())
    except (KeyboardInterrupt, web.GracefulExit):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
