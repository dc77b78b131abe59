"""Peer servers for the benchmark suite: the same session API on other stacks.

    python -m app.loadkit.peers --kind stock --port 8101 --redis redis://...

Kinds (each serves `GET` and `PATCH /apps/demo/session` like the gateway, on uvloop):
- `stock`: aiohttp-session's own `RedisStorage` (the peer): a read is one `GET` (no TTL
  slide), a changed session is saved with `SET ... EX` after the handler.
- `nosession`: no session at all (a ceiling: aiohttp's own cost for this request).
- `rawget`: one raw redis-py `GET` per request (a ceiling: aiohttp + one redis-py command).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from aiohttp_session import get_session, session_middleware
from aiohttp_session.redis_storage import RedisStorage

from app.loadkit.loops import loop_factory

PATH = "/apps/demo/session"
RAW_PREFIX = "bench:raw:"
REDIS_KEY = web.AppKey("redis", aioredis.Redis)


def _client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, decode_responses=False, protocol=2)


def _merge(current: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    merged = dict(current)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def stock_app(redis_url: str) -> web.Application:
    client = _client(redis_url)
    storage = RedisStorage(client, max_age=3600, samesite="Lax", httponly=True)

    async def read(request: web.Request) -> web.Response:
        session = await get_session(request)
        return web.json_response({"data": session.get("data", {})})

    async def write(request: web.Request) -> web.Response:
        patch = await request.json()
        session = await get_session(request)
        current = session.get("data", {})
        merged = _merge(current, patch)
        if merged != current or session.new:
            session["data"] = merged
        return web.json_response({"data": merged})

    app = web.Application(middlewares=[session_middleware(storage)])
    app.router.add_get(PATH, read)
    app.router.add_patch(PATH, write)

    async def close(_: web.Application) -> None:
        await client.aclose()

    app.on_cleanup.append(close)
    return app


def nosession_app() -> web.Application:
    async def read(request: web.Request) -> web.Response:
        return web.json_response({"data": {}})

    async def write(request: web.Request) -> web.Response:
        return web.json_response({"data": _merge({}, await request.json())})

    app = web.Application()
    app.router.add_get(PATH, read)
    app.router.add_patch(PATH, write)
    return app


def rawget_app(redis_url: str) -> web.Application:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[REDIS_KEY] = _client(redis_url)
        yield
        await app[REDIS_KEY].aclose()

    async def read(request: web.Request) -> web.Response:
        sid = request.cookies.get("sid", "none")
        raw = await request.app[REDIS_KEY].get(RAW_PREFIX + sid)
        data = json.loads(raw)["data"] if raw else {}
        return web.json_response({"data": data})

    app = web.Application()
    app.cleanup_ctx.append(ctx)
    app.router.add_get(PATH, read)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.loadkit.peers")
    parser.add_argument("--kind", choices=("stock", "nosession", "rawget"), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    if args.kind == "stock":
        app = stock_app(args.redis)
    elif args.kind == "rawget":
        app = rawget_app(args.redis)
    else:
        app = nosession_app()
    loop = (loop_factory() or asyncio.new_event_loop)()
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
