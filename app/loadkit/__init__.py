"""agent-bff load-testing kit: session-aware virtual users, an SSE upstream stub, reports and
the benchmark suite.

Inside the `app` package so `pip install 'agent-bff[load]'` installs it with its commands
(`agent-bff-loadgen`, `agent-bff-stub`, `agent-bff-bench`; docs/load-testing.md), but nothing
in the gateway imports it: `import app` and `python -m app` never load this package or its
extra dependencies (hdrhistogram, matplotlib; the `load` extra).

Which module for which change:
- `commands`: the console commands (and scripts/ wrappers), checking for the `load` extra.
- `loadgen` (main, progress line, outputs, exit codes) and `arguments` (its command line).
- `runner` (`run_load`: the users' lives) -> `user` (one virtual user's requests and session
  checks) -> `streams` (reading one SSE answer); `recording` (what a run is asked to do and what
  it recorded), `stats` (HDR histograms, timeline), `sse` (the SSE parser).
- `report` (figures, thresholds, verdict) and `htmlreport` (the HTML page with plots).
- `stub` (the SSE upstream), `peers` (the servers the bench compares with).
- `bench/` (the benchmark suite), `concurrency` (concurrent slow streams; its servers in
  `concurrency_servers`, its figures in `concurrency_figures`) and `traced_gateway`, `wrk`
  (driving wrk), `profiles` (py-spy).
- `processes`, `ports`, `loops`: starting child processes, free ports, the event loop.
"""

__version__ = "1"
