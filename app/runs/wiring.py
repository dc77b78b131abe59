"""The runs' place in the application: the cleanup context that builds the run registry, its
Redis run store (with a second client for blocking reads) and its metrics, and closes them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from app.config import Settings
from app.keys import BACKEND_KEY, LIFECYCLE_KEY, RUNS_KEY, UPSTREAM_KEY
from app.metrics import exported
from app.runs.collector import RunsCollector
from app.runs.entries import ENTRY_BYTES
from app.runs.readers import ReaderCaps
from app.runs.runs import RunRegistry
from app.runs.store import RedisRunStore
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import make_client


def runs_ctx(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """Cleanup context (after the store's and the upstream's): the registry, with a Redis
    run store on the session store's Redis (plus a small pool for blocking reads)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        backend = app[BACKEND_KEY]
        store: RedisRunStore | None = None
        follow: RedisBackend | None = None
        readers = reader_caps(settings)
        if isinstance(backend, RedisBackend):
            # Blocking reads (one per followed run) and the catch-up reads' gate.
            follow = follow_backend(
                settings, backend, readers.pool_size + settings.run_catchup_reads
            )
            store = RedisRunStore(
                backend,
                follow,
                settings.redis_aux_prefix,
                catchup_reads=settings.run_catchup_reads,
                catchup_wait=settings.run_catchup_wait_seconds,
                max_entry=max((app.resume_max_bytes for app in settings.apps.values()), default=0)
                + ENTRY_BYTES,
            )
        registry = RunRegistry(settings, store, app[LIFECYCLE_KEY], app[UPSTREAM_KEY].stop, readers)
        app[RUNS_KEY] = registry
        try:
            with exported(app, RunsCollector(registry)):
                yield
        finally:
            await registry.close()
            if follow is not None and follow is not backend:
                await follow.close()

    return ctx


def reader_caps(settings: Settings) -> ReaderCaps:
    """The resume readers' caps (app/runs/readers.py) the settings describe."""
    return ReaderCaps(
        settings.apps,
        follow_connections=settings.run_follow_connections,
        follows_per_client=settings.run_follows_per_client,
        readers_per_run=settings.run_readers_per_run,
    )


def follow_backend(settings: Settings, backend: RedisBackend, connections: int) -> RedisBackend:
    """A second client for blocking `XREAD`s and catch-up reads: at most `connections` (the
    sum of the applications' follow shares, app/runs/readers.py, and `RUN_CATCHUP_READS`),
    never the sessions' pipelined connection; socket and operation deadlines
    stretched by one heartbeat (the longest block)."""
    from app.main import redis_options  # the one place Redis options are built

    if settings.redis_url is None:  # a test backend without settings: share it
        return backend
    options = redis_options(settings)
    options = type(options)(
        **{
            **{name: getattr(options, name) for name in options.__dataclass_fields__},
            "max_connections": connections,
            "socket_timeout": options.socket_timeout + settings.run_heartbeat_seconds,
            "client_name": f"{options.client_name}-follow",
        }
    )
    return RedisBackend(
        make_client(options),
        op_timeout=settings.redis_op_timeout_seconds + settings.run_heartbeat_seconds,
        pipelining=False,
    )
