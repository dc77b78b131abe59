"""agent-bff load-testing kit: session-aware virtual users, an SSE upstream stub, reports.

Lives under `scripts/` (not in the `app` package) so the gateway stays lean; the entry points
are `scripts/loadgen.py`, `scripts/upstream_stub.py` and `scripts/bench.py`, which put this
directory on `sys.path` simply by being run from it.
"""

__version__ = "1"
