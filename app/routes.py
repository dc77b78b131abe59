"""`setup_routes`: the whole URL map on one screen."""

from __future__ import annotations

from aiohttp import web

from app import handlers
from app.demo_agent import STATIC_DIR, demo_page
from app.proxy.handler import agent_proxy
from app.runs import http as run_handlers


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", handlers.healthz, allow_head=True)
    app.router.add_get("/readyz", handlers.readyz, allow_head=True)
    session = "/apps/{applicationId}/session"
    app.router.add_get(session, handlers.get_session_data, allow_head=False)
    app.router.add_patch(session, handlers.patch_session_data)
    app.router.add_delete(session, handlers.delete_session)
    # OPTIONS is routed so CORS preflights reach the origin middleware (which answers them).
    app.router.add_route("OPTIONS", session, handlers.method_not_allowed)
    app.router.add_post(f"{session}/rotate", handlers.rotate_session_id)
    app.router.add_route("OPTIONS", f"{session}/rotate", handlers.method_not_allowed)
    # Every method (OPTIONS included, so preflights reach the origin middleware) goes upstream.
    # `[\s\S]*`, not `.*`: an encoded newline in the path must reach the proxy's path check
    # (a clear 400 `invalid_path`), not fall through to a 404.
    app.router.add_route("*", r"/apps/{applicationId}/agent/{path:[\s\S]*}", agent_proxy)
    # Resumable runs (app/runs/): resume (EventSource-compatible GET) and stop, on any replica.
    runs = "/apps/{applicationId}/runs/{runId}"
    app.router.add_get(runs, run_handlers.resume_run, allow_head=False)
    app.router.add_route("OPTIONS", runs, handlers.method_not_allowed)
    app.router.add_post(f"{runs}/stop", run_handlers.stop_run)
    app.router.add_route("OPTIONS", f"{runs}/stop", handlers.method_not_allowed)
    # The demo chat page and its assets (talks to application `demo`).
    app.router.add_get("/", demo_page)
    app.router.add_static("/static", STATIC_DIR, append_version=False)
