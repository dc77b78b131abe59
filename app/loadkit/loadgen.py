"""`agent-bff-loadgen` (scripts/loadgen.py): command line, target checks, progress, outputs, exit.

Exit codes: 0 the run passed its thresholds; 1 a threshold was violated (including lost
sessions, default limit 0); 2 bad usage (including a non-loopback URL without
`--allow-remote`); 3 the target did not answer at all before the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import aiohttp

from app.loadkit.arguments import TargetRefused, build_parser, check_target, parse_headers
from app.loadkit.loops import loop_factory
from app.loadkit.recording import (
    LoadConfig,
    Recorder,
    classify,
)
from app.loadkit.report import (
    Thresholds,
    build_report,
    format_summary,
)
from app.loadkit.runner import run_load

EXIT_OK, EXIT_THRESHOLDS, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class Progress:
    """The live line on stderr: rewritten in place on a terminal, one line a second otherwise."""

    def __init__(self, stream: TextIO, config: LoadConfig) -> None:
        self.stream = stream
        self.config = config
        self.tty = stream.isatty()
        self.last_total = 0
        self.last_t = 0.0

    def __call__(self, rec: Recorder) -> None:
        now = rec.now()
        total = rec.total
        rate = (total - self.last_total) / max(now - self.last_t, 1e-9)
        self.last_total, self.last_t = total, now
        p99 = rec.latency["read"].percentile_ms(99) if rec.latency["read"].count else 0.0
        line = (
            f"[{now:6.1f}s/{self.config.duration:g}s] users {rec.active_users}/"
            f"{self.config.concurrency}  requests {total} ({rate:.0f}/s)  "
            f"errors {rec.total_errors}  lost {rec.lost + rec.stale}  "
            f"streams {rec.streams_completed}/{rec.count['stream']}  read p99 {p99:.1f} ms"
        )
        if rec.count["resume"]:
            line += f"  resumed {rec.resume.completed}/{rec.count['resume']} lost {rec.resume.lost}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


async def preflight(url: str, seconds: float) -> str | None:
    """None when something answers at `url` (any HTTP status), else why not."""
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                url.rstrip("/") + "/healthz", timeout=aiohttp.ClientTimeout(total=seconds)
            ) as resp,
        ):
            await resp.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as err:
        return f"{classify(err)}: {err}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_target(args.url, allow_remote=args.allow_remote)
    except TargetRefused as err:
        print(f"loadgen: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        json.loads(args.stream_body)
    except ValueError:
        parser.error("--stream-body must be JSON")
    if args.payload_bytes < 0 or args.payload_bytes > 60_000:
        parser.error("--payload-bytes must be 0..60000 (sessions are capped by the gateway)")
    if args.html is not None:
        try:
            import app.loadkit.htmlreport  # noqa: F401 - fail now, not after the run
        except ImportError as err:
            print(
                f"loadgen: --html needs matplotlib ({err}); pip install 'agent-bff[load]'",
                file=sys.stderr,
            )
            return EXIT_USAGE
    config = LoadConfig(
        url=args.url.rstrip("/"),
        app=args.app,
        concurrency=int(args.concurrency),
        duration=args.duration,
        ramp_up=args.ramp_up,
        max_requests=int(args.requests) if args.requests is not None else None,
        mix=args.mix,
        think_time=args.think_ms / 1000,
        timeout=args.timeout,
        stream_idle_timeout=args.stream_idle_timeout,
        agent_path=args.agent_path,
        stream_body=args.stream_body.encode(),
        end_event=args.end_event,
        payload_bytes=args.payload_bytes,
        grace=args.grace,
        verify_at_end=not args.no_verify,
        headers=parse_headers(args.header, parser),
        seed=args.seed,
    )
    thresholds = Thresholds(
        max_p99_ms=args.max_p99_ms,
        max_ttfe_p99_ms=args.max_ttfe_p99_ms,
        max_error_rate=args.max_error_rate,
        max_lost_sessions=args.max_lost_sessions,
        min_samples=int(args.min_samples),
    )
    show_progress = sys.stderr.isatty() if args.progress is None else args.progress
    progress = Progress(sys.stderr, config) if show_progress else None
    return _run(config, thresholds, args, progress)


def _run(
    config: LoadConfig, thresholds: Thresholds, args: argparse.Namespace, progress: Progress | None
) -> int:
    async def go() -> tuple[Recorder | None, str | None]:
        why = await preflight(config.url, min(config.timeout, 5.0))
        if why is not None:
            return None, why
        return await run_load(config, progress=progress), None

    cpu0 = time.process_time()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        recorder, why = runner.run(go())
    cpu = time.process_time() - cpu0
    if progress is not None:
        progress.close()
    if recorder is None:
        print(f"loadgen: nothing answers at {config.url} ({why})", file=sys.stderr)
        return EXIT_UNREACHABLE
    report = build_report(recorder, config, thresholds, client_cpu_seconds=cpu)
    summary_to = sys.stdout
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        summary_to = sys.stderr
    elif args.json is not None:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.html is not None:
        from app.loadkit.htmlreport import write_html

        write_html(report, Path(args.html))
    if not args.quiet:
        print(format_summary(report), file=summary_to)
    return EXIT_OK if report["passed"] else EXIT_THRESHOLDS


if __name__ == "__main__":
    sys.exit(main())
