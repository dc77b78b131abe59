"""`python -m app`: read settings, configure logging, serve. Exit 2 on bad configuration
(or a bad command line), 1 when the session store cannot be reached at start (or the port
cannot be bound), 0 after a clean shutdown on SIGTERM or SIGINT.

Settings come from the environment plus one optional dotenv file: `.env` in the current working
directory, or the file named by `--env-file` (which must then exist). `--help` prints usage
and exits without serving.

Serving is spelled out (instead of `web.run_app`) to control the shutdown order that
zero-downtime restarts behind a load balancer need; see `app/lifecycle.py`: mark not ready
and close connections after their current response, close the listener, drain in-flight
requests and idle keep-alive connections, then let aiohttp clean up (Redis closes last).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from app.access_log import AccessLogger, enable_fast_path
from app.applications import describe_apps
from app.config import ConfigError, Settings
from app.keys import LIFECYCLE_KEY
from app.logs import configure_logging
from app.main import StoreStartupError, create_app

log = logging.getLogger("app")

# After the drain has finished requests and told streams to stop, this is how long aiohttp
# waits for the last handlers to return before cancelling them.
_FINAL_GRACE_SECONDS = 5.0


def _new_loop() -> asyncio.AbstractEventLoop:
    if os.environ.get("UVLOOP", "1") != "0":
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


# Young-generation threshold: requests allocate many short-lived containers; collecting every
# 700 allocations (CPython's default) costs more than it frees here.
_GC_GEN0_THRESHOLD = 20_000


def _settle_garbage_collector() -> None:
    """Once serving: move everything built at start-up (modules, app, pools) out of the
    collector's view (`gc.freeze`) and collect the young generation less often. A full
    collection then walks only what requests created, not the ~10^5 start-up objects: its
    pauses fell from 40-75 ms to a few ms under load, which is p99 latency."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(_GC_GEN0_THRESHOLD, gen1, gen2)


class ListenError(Exception):
    """The port could not be bound; `python -m app` exits 1."""


async def serve(app: web.Application, settings: Settings) -> None:
    """Serve `app` until SIGTERM/SIGINT, then shut down gracefully. Raises
    `StoreStartupError` (store unreachable) or `ListenError` (port unavailable) at start."""
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log_class=AccessLogger,
        shutdown_timeout=_FINAL_GRACE_SECONDS,
    )
    try:
        # Startup (the session store's PING) runs before the port is bound: a replica accepts
        # connections only once it can serve them. Inside the `try`: when a later startup step
        # fails, `cleanup()` still exits the contexts already entered (Redis pool, sweeper).
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port, backlog=settings.listen_backlog)
        try:
            await site.start()
        except OSError as err:
            raise ListenError(f"cannot listen on {settings.host}:{settings.port} ({err})") from err
        _settle_garbage_collector()
        loop = asyncio.get_running_loop()
        log.info(
            "listening on http://%s:%s (event loop: %s)",
            settings.host,
            settings.port,
            type(loop).__module__.split(".")[0],
        )
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received: shutting down")
        lifecycle = app[LIFECYCLE_KEY]
        lifecycle.begin_shutdown()
        await site.stop()  # the listener closes now: new connections are refused
        server = runner.server
        await lifecycle.drain(lambda: len(server.connections) if server is not None else 0)
    finally:
        await runner.cleanup()


DEFAULT_ENV_FILE = ".env"


def _version() -> str:
    try:
        return importlib.metadata.version("agent-bff")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The command line: configuration itself stays in the environment (README: Configuration)."""
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description=(
            "agent-bff: a session gateway between browser frontends and AI-agent services. "
            "Every setting comes from the environment (HOST, PORT, SESSION_STORE, REDIS_URL, "
            "APPS_FILE, ...; see README.md, 'Configuration'), plus one optional dotenv file "
            "whose values the environment overrides."
        ),
        epilog=(
            "Exit codes: 0 clean shutdown (SIGTERM/SIGINT); 1 the session store or the port "
            "is unavailable at start; 2 a bad setting or command line. "
            "Example: PORT=9000 SESSION_STORE=memory python -m app"
        ),
    )
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        default=None,
        help=f"dotenv file to read (default: {DEFAULT_ENV_FILE} in the current working "
        "directory, if it exists; a PATH given here must exist)",
    )
    parser.add_argument("--version", action="version", version=f"agent-bff {_version()}")
    return parser


def _log_applications(settings: Settings) -> None:
    source = f"APPS_FILE={settings.apps_file}" if settings.apps_file else "built-in default"
    log.info("applications (%d, %s): %s", len(settings.apps), source, describe_apps(settings.apps))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env_file = args.env_file if args.env_file is not None else DEFAULT_ENV_FILE
    if args.env_file is not None and not os.path.isfile(env_file):
        print(
            f"agent-bff: configuration error: --env-file {env_file}: no such file "
            "(omit --env-file to read ./.env only if it exists)",
            file=sys.stderr,
        )
        return 2
    try:
        settings = Settings.from_env(dotenv_path=env_file)
    except ConfigError as err:
        for problem in err.problems:
            print(f"agent-bff: configuration error: {problem}", file=sys.stderr)
        return 2
    handler = configure_logging(settings.log_level, settings.log_format, salt=settings.log_salt)
    enable_fast_path(handler, settings.fast_paths)
    _log_applications(settings)
    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            runner.run(serve(create_app(settings), settings))
    except StoreStartupError as err:
        print(f"agent-bff: startup error: {err}", file=sys.stderr)
        return 1
    except ListenError as err:
        print(f"agent-bff: startup error: {err}: is another process using PORT?", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
