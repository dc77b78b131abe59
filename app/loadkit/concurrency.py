"""Many concurrent slow streams through one gateway process: memory per open stream, whether
every stream completes, event delivery times under that load, and CPU per relayed event.

    .venv/bin/python scripts/concurrency.py --streams 5000     # about 2 minutes, 3 processes
    .venv/bin/python scripts/concurrency.py --streams 200 --events 3 --pause-ms 300   # smoke

What runs (all on this machine, loopback only; nothing here takes a URL): the upstream stub
(`app.loadkit.stub`, `--stamp`: each event carries the CLOCK_MONOTONIC time it was written), one
gateway (`python -m app`, memory store, `UPSTREAM_POOL_SIZE` and the application's
`max_concurrent_requests` = `--streams`, `max_concurrent_per_client = 0` and
`max_concurrent_per_session = 0` since every stream comes from 127.0.0.1) and the client,
this process. With 2+ CPUs the gateway is pinned to CPU 0, the stub and this client to CPU 1,
so the gateway's CPU time is its own.

Phases: `--warmup-streams` short streams (lazy imports, first allocations); one session per
stream created with `PATCH` (so the figure is what a stream costs on top of its session);
the idle RSS; then `--streams` streams of `--events` events `--pause-ms` apart opened with at
most `--connect-concurrency` connecting at once (below a listen backlog of 128, aiohttp's),
each read to its `done` event. The default stream (60 events 1 s apart) outlasts opening 5,000
streams on a busy 2-core machine (25-50 s), so they are all open at once for a while. RSS, CPU and
the number of open streams are sampled every `SAMPLE_SECONDS`. The plateau is the samples at
the largest number of streams open at once (all of them when opening them all takes less than
one stream's length); CPU is read over the samples with at least 90% of that open.

Figures (`--json` writes them all): RSS per open stream = (largest plateau RSS - idle RSS) /
streams open; streams completed (all token events, then `done` announcing as many); event
delivery time (stub write -> client parse) p50/p99/max; stream opening time (request sent ->
response head) p50/p99; the gateway's CPU per event while >= 90% of the peak is open and the
events/s per core derived from it; streams per GiB from the per-stream RSS.

`--direct` is the baseline: the same streams straight to the stub (the gateway idles), for the
delivery times the stub and this client account for by themselves on this machine.

Bounded: the whole run stops after `--max-seconds` (default: the stream length plus 120 s)
whatever happens; every process it started is stopped by its PID. The per-process open-file
limit is raised to its hard limit first (inherited by the servers): N streams hold N sockets
in this client, 2N in the gateway and N in the stub.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from app.loadkit.bench.lab import create_sessions
from app.loadkit.concurrency_figures import Sample, Tally, format_summary, summarize
from app.loadkit.concurrency_servers import Servers, raise_open_files
from app.loadkit.loops import loop_factory
from app.loadkit.sse import SSEParser

SAMPLE_SECONDS = 0.25
AGENT_PATH = "/apps/demo/agent/stream"
EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True, slots=True, kw_only=True)
class ScaleOptions:
    streams: int = 5000
    events: int = 60
    pause_ms: float = 1000.0
    size: int = 200
    body_bytes: int = 0  # padding of each stream's request body (a chat history's size)
    connect_concurrency: int = 64
    warmup_streams: int = 20
    max_seconds: float | None = None
    pin: bool = True
    gateway_env: tuple[tuple[str, str], ...] = ()
    tracemalloc_dump: Path | None = None  # a snapshot of the gateway at the plateau
    direct: bool = False  # the streams go to the stub itself: the baseline without a gateway

    @property
    def stream_seconds(self) -> float:
        return max(0, self.events - 1) * self.pause_ms / 1000

    @property
    def deadline_seconds(self) -> float:
        return self.max_seconds or self.stream_seconds + 120.0


async def _one_stream(
    http: aiohttp.ClientSession,
    url: str,
    cookie: str | None,
    tally: Tally,
    connecting: asyncio.Semaphore,
    *,
    record: bool = True,
    body: bytes = b'{"input":"hi"}',
) -> None:
    """One agent request read as SSE to its `done` event; the outcome goes to `tally`."""
    headers = {"X-CSRF": "1", "Content-Type": "application/json", "Accept": "text/event-stream"}
    if cookie:
        headers["Cookie"] = cookie
    opened = False
    try:
        async with connecting:
            sent = time.monotonic()
            resp = await http.post(url, data=body, headers=headers)
            if record:
                tally.open_s.append(time.monotonic() - sent)
        async with resp:
            if resp.status != 200:
                tally.failures[f"status_{resp.status}"] += 1
                return
            opened = True
            tally.open += 1
            parser = SSEParser()
            tokens = 0
            announced: int | None = None
            async for chunk in resp.content.iter_any():
                now = time.monotonic_ns()
                for event in parser.feed(chunk):
                    if event.type == "token":
                        tokens += 1
                        if record:
                            tally.events += 1
                            tally.delivery_ns.append(now - int(event.data.split(" ", 2)[1]))
                            tally.arrival_ns.append(now)
                    elif event.type == "done":
                        announced = json.loads(event.data).get("events")
            if announced is not None and announced == tokens and not parser.pending:
                tally.completed += 1
            else:
                tally.failures["truncated"] += 1
    except (aiohttp.ClientError, OSError, ValueError, IndexError) as err:
        tally.failures[type(err).__name__] += 1
    finally:
        if opened:
            tally.open -= 1


async def _sample(
    servers: Servers, tally: Tally, samples: list[Sample], stop: asyncio.Event
) -> None:
    gateway = servers.gateway
    assert gateway is not None
    t0 = time.monotonic()
    dump = servers.options.tracemalloc_dump is not None
    while not stop.is_set():
        if dump and tally.open >= 0.8 * servers.options.streams:
            # --tracemalloc-dump: a snapshot of the gateway once most streams are open
            os.kill(gateway.pid, signal.SIGUSR1)
            tally.open_at_dump = tally.open
            dump = False
        samples.append(
            Sample(
                time.monotonic() - t0,
                tally.open,
                tally.events,
                gateway.rss_mb(),
                gateway.cpu_seconds(),
                time.monotonic_ns(),
            )
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)


async def measure(servers: Servers, log: Callable[[str], None]) -> dict[str, Any]:
    """The client side of a run (servers started): warm-up, sessions, idle RSS, the streams."""
    o = servers.options
    gateway = servers.gateway
    assert gateway is not None
    url = servers.gateway_url + AGENT_PATH
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=o.pause_ms / 1000 + 30)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), timeout=timeout
    ) as http:
        warm = Tally()
        short = f"{url}?events=2&pause_ms=0"
        sem = asyncio.Semaphore(o.connect_concurrency)
        await asyncio.gather(
            *(
                _one_stream(http, short, None, warm, sem, record=False)
                for _ in range(o.warmup_streams)
            )
        )
        if warm.completed != o.warmup_streams:
            raise RuntimeError(f"warm-up streams failed: {dict(warm.failures)}\n{gateway.tail()}")
        log(f"creating {o.streams} sessions")
        cookies = await create_sessions(servers.gateway_url, o.streams)
        await asyncio.sleep(1.0)
        idle_rss = gateway.rss_mb()
        idle_cpu = gateway.cpu_seconds()
        log(f"idle gateway RSS {idle_rss:.1f} MB; opening {o.streams} streams")
        if o.tracemalloc_dump is not None:
            os.kill(gateway.pid, signal.SIGUSR2)  # tracing starts now (loadkit.traced_gateway)
            await asyncio.sleep(0.2)
        tally = Tally()
        samples: list[Sample] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample(servers, tally, samples, stop))
        started = time.monotonic()
        target = servers.stub_url + "/base/stream" if o.direct else url
        body = json.dumps({"input": "hi", "history": "x" * o.body_bytes}).encode()
        await asyncio.gather(
            *(_one_stream(http, target, c, tally, sem, body=body) for c in cookies)
        )
        wall = time.monotonic() - started
        stop.set()
        await sampler
    total_cpu = gateway.cpu_seconds() - idle_cpu
    return summarize(o, tally, samples, idle_rss=idle_rss, wall=wall, total_cpu=total_cpu)


def run(options: ScaleOptions, *, log: Callable[[str], None]) -> dict[str, Any]:
    """Start the servers, measure, stop them (by PID); bounded by `deadline_seconds`."""
    limits = raise_open_files()
    needed = 2 * options.streams + 200
    if limits[0] < needed:
        raise RuntimeError(
            f"the open-file limit is {limits[0]} (hard {limits[1]}); {options.streams} streams "
            f"need about {needed} in the gateway"
        )
    with tempfile.TemporaryDirectory(prefix="agent-bff-concurrency-") as tmp:
        servers = Servers(options, Path(tmp))
        try:
            servers.start()
            if servers.client_cpu is not None:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, {servers.client_cpu})

            async def bounded() -> dict[str, Any]:
                return await asyncio.wait_for(
                    measure(servers, log), timeout=options.deadline_seconds
                )

            cpu0 = _own_cpu_seconds()
            stub_cpu0 = servers.procs[0].cpu_seconds()
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                try:
                    result = runner.run(bounded())
                except TimeoutError:
                    raise RunTimedOut(
                        f"the run did not end within {options.deadline_seconds:g} s "
                        "(--max-seconds); every process was stopped"
                    ) from None
            result["client_cpu_seconds"] = round(_own_cpu_seconds() - cpu0, 2)
            result["stub_cpu_seconds"] = round(servers.procs[0].cpu_seconds() - stub_cpu0, 2)
            result["open_files_limit"] = limits[0]
            return result
        finally:
            servers.stop()


class RunTimedOut(RuntimeError):
    """The run reached its bound (`--max-seconds`) before every stream ended."""


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="concurrency.py",
        description="N concurrent slow streams through one gateway (loopback only; see "
        "app/loadkit/concurrency.py). Exit 0: every stream completed; 1: some did not.",
    )
    parser.add_argument("--streams", type=int, default=5000, help="concurrent streams (5000)")
    parser.add_argument("--events", type=int, default=60, help="events per stream (60)")
    parser.add_argument("--pause-ms", type=float, default=1000.0, help="between events (1000)")
    parser.add_argument("--size", type=int, default=200, help="bytes of data per event (200)")
    parser.add_argument(
        "--body-bytes", type=int, default=0, help="pad each request body by this much (0)"
    )
    parser.add_argument("--connect-concurrency", type=int, default=64, help="connecting at once")
    parser.add_argument("--warmup-streams", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=None, help="hard bound on the run")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--tracemalloc-dump",
        type=Path,
        default=None,
        help="run the gateway under tracemalloc and write a snapshot here once all are open",
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="the baseline: streams straight to the stub (delivery and client figures only)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    if not (1 <= args.streams <= 9000 and 1 <= args.events <= 10_000 and args.pause_ms >= 0):
        parser.error("--streams must be 1..9000, --events 1..10000, --pause-ms >= 0")
    options = ScaleOptions(
        streams=args.streams,
        events=args.events,
        pause_ms=args.pause_ms,
        size=max(args.size, 40),
        body_bytes=max(0, min(args.body_bytes, 1_000_000)),
        connect_concurrency=args.connect_concurrency,
        warmup_streams=args.warmup_streams,
        max_seconds=args.max_seconds,
        pin=not args.no_pin,
        direct=args.direct,
        tracemalloc_dump=args.tracemalloc_dump.resolve() if args.tracemalloc_dump else None,
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        result = run(options, log=log)
    except RunTimedOut as err:
        print(f"concurrency.py: {err}", file=sys.stderr)
        return EXIT_INCOMPLETE
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    print(format_summary(result))
    return EXIT_OK if result["completed"] == options.streams else EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
