"""Every typed key the gateway shares through `web.Application` and `web.Request`, in one place.

Application keys are set once by the wiring (`app.main.create_app` and the cleanup contexts it
installs) and read by handlers; request keys are set by the gateway middleware
(`app.middlewares.setup_gateway`) or the session step and read further in. A module that needs
a key imports it from here, never from the module that happens to set it, so no feature module
imports another only for a key (the rate limiter once imported the middleware for one).

This module imports nothing of the gateway at run time (the value types are named for the
type checker only), so any module can import it without an import cycle. Keys private to one
module's implementation (a flag the metrics keep between two calls of their own) stay in that
module, as private attributes would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from app.applications import AppConfig
    from app.config import Settings
    from app.demo_agent import DemoState
    from app.lifecycle import Lifecycle
    from app.metrics import Metrics
    from app.runs.runs import RunRegistry
    from app.sessions.backend import SessionBackend
    from app.sessions.middleware import SessionCreationGate
    from app.sessions.storage import SessionStorage
    from app.sessions.stored_session import StoredSession
    from app.upstream import Upstream

# -- application keys (set at start-up, read by handlers) ----------------------------------------

# The validated configuration (`app.config.Settings`).
SETTINGS_KEY: web.AppKey[Settings] = web.AppKey("settings")
# Shutdown state: draining, open streams (`app.lifecycle`).
LIFECYCLE_KEY: web.AppKey[Lifecycle] = web.AppKey("lifecycle")
# The session store as opened (memory or Redis), without the metrics wrapper: readiness pings.
BACKEND_KEY: web.AppKey[SessionBackend] = web.AppKey("session_backend")
# The gateway's `SessionStorage` (over the instrumented backend).
STORAGE_APP_KEY: web.AppKey[SessionStorage] = web.AppKey("session_storage")
# The application's Prometheus metrics (`app.metrics.setup_metrics`).
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics")
# Awaited before a new session is first stored (`app.creation_limit`, read by
# `app.sessions.middleware.commit_session`).
CREATION_GATE_KEY: web.AppKey[SessionCreationGate] = web.AppKey("session_creation_gate")
# The upstream HTTP client and its capacity (`app.upstream.upstream_ctx`).
UPSTREAM_KEY: web.AppKey[Upstream] = web.AppKey("upstream")
# Resumable runs (`app.runs.wiring.runs_ctx`).
RUNS_KEY: web.AppKey[RunRegistry] = web.AppKey("runs")
# The built-in demo agent's conversation turns (`app.demo_agent`).
DEMO_STATE_KEY: web.AppKey[DemoState] = web.AppKey("demo_state")

# -- request keys (set by the gateway middleware, read further in) -------------------------------

# The request's id (`X-Request-Id`), in every error envelope and log line.
REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("request_id")
# `time.perf_counter()` when the gateway middleware started on the request (access log).
REQUEST_STARTED_KEY: web.RequestKey[float] = web.RequestKey("request_started")
# The configured application the path names, and its id (the session namespace).
APP_CONFIG_KEY: web.RequestKey[AppConfig] = web.RequestKey("app_config")
APP_ID_KEY: web.RequestKey[str] = web.RequestKey("application_id")
# The request's allowed `Origin`, echoed in the CORS headers.
CORS_ORIGIN_KEY: web.RequestKey[str] = web.RequestKey("cors_origin")
# Set once a response for the request has started (headers sent): too late for an error body.
RESPONSE_STARTED_KEY: web.RequestKey[bool] = web.RequestKey("response_started")
# The session storage serving the request (aiohttp-session's keys are plain strings, which
# aiohttp 3.14 warns about on every request).
STORAGE_KEY: web.RequestKey[SessionStorage] = web.RequestKey("session_storage")
# The request's session once loaded; None before (the gateway middleware sets it first thing:
# looking up a missing key costs a raised and caught KeyError).
SESSION_KEY: web.RequestKey[StoredSession | None] = web.RequestKey("session")
