"""The benchmark suite: the gateway beside its peers, measured in one run, as ratios.

    agent-bff-bench              # the full run (about 8 minutes); scripts/bench.py in a checkout
    agent-bff-bench --smoke      # every row once, briefly (about 30 s)

Layout (2+ cores): every server under test (gateway, peers, nginx, and the upstream stub)
pinned to CPU 0 with `taskset`; wrk, Redis, the kit and this script on CPU 1. The SSE rows
therefore put the stub on CPU 0 beside the proxy (gateway or nginx) and beside nothing for the
direct row. Rows run interleaved (row 1..N, then again) so drift hits every row alike; each
figure is the median of the repetitions with min and max beside it.

Rows: session read (`GET`) and write (`PATCH`, which also reads) through the gateway on Redis
and on the memory store; the same on aiohttp-session's stock `RedisStorage`; a no-session
aiohttp handler and one doing one raw redis-py `GET` (ceilings); SSE relay of 50 events of 200
bytes direct / through the gateway (session on) / through nginx (`proxy_buffering off`). Then:
Redis commands per request (`INFO commandstats`), time to first event added by each proxy,
RSS of the memory store holding 100k sessions, RSS before/after a mixed run with the kit.

Modules: `options` (what a run does), `lab` (the processes of one run), `rows` (the wrk rows),
`probes` (time to first event, memory), `ratios` (targets and verdicts), `table` (the printed
report), `suite` (the run in order, and the command line).
"""

from app.loadkit.bench.suite import main, run

__all__ = ["main", "run"]
