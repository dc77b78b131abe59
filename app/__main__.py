"""`python -m app`: read settings, configure logging, serve. Exit 2 on bad configuration,
1 when the session store cannot be reached at start, 0 after a clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from aiohttp import web

from app.config import ConfigError, Settings
from app.logs import AccessLogger, configure_logging
from app.main import StoreStartupError, create_app

log = logging.getLogger("app")

# After on_shutdown has drained requests and told streams to stop, this is how long aiohttp
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


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as err:
        for problem in err.problems:
            print(f"agent-bff: configuration error: {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    loop = _new_loop()
    try:
        web.run_app(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            shutdown_timeout=_FINAL_GRACE_SECONDS,
            access_log_class=AccessLogger,
            print=lambda msg: log.info("listening on http://%s:%s", settings.host, settings.port),
            loop=loop,
        )
    except StoreStartupError as err:
        print(f"agent-bff: startup error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
