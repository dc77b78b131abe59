"""The event loop the kit's programs run on: uvloop when installed, as the gateway does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when uvloop can be imported (the gateway's own dependency on every
    platform but Windows), else None: `asyncio.Runner`'s default loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
