"""Issue 12 row 5 (docs/reliability.md 12.5), on both of aiohttp's request parsers: TRACE and
TRACK never reach an upstream (it would echo the configured credential headers), CONNECT never
opens anything. Two real `python -m app` processes (the C parser refuses TRACK itself; the
pure-Python one accepts any token) and a recording upstream, from tests/test_http_parsers.py.
"""

from __future__ import annotations

import asyncio
import json

from tests.test_http_parsers import (  # noqa: F401 (module fixtures: one process per parser)
    Gateway,
    exchange,
    gateway,
    recorder,
    statuses,
)


def test_trace_track_and_connect_never_reach_the_upstream_on_either_parser(
    gateway: Gateway,  # noqa: F811
) -> None:
    gateway.recorder.clear()
    for method in ("TRACE", "TRACK", "CONNECT"):
        head = f"{method} /apps/shop/agent/items HTTP/1.1\r\nHost: 127.0.0.1\r\nX-CSRF: 1\r\n"
        answer = asyncio.run(
            exchange(gateway.proc.port, (head + "Connection: close\r\n\r\n").encode())
        )
        status = statuses(answer)
        if status == [405]:
            body = answer.partition(b"\r\n\r\n")[2]
            assert json.loads(body)["error"]["code"] == "method_not_allowed"
        else:
            # Refused by the parser or the router before any handler (C parser: TRACK;
            # CONNECT's target is an authority, never an agent path).
            assert method != "TRACE" and status in ([400], [404]), (
                gateway.parser,
                method,
                answer[:300],
            )
    assert gateway.recorder.paths() == []
