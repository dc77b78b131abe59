"""agent-bff load-testing kit: session-aware virtual users, an SSE upstream stub, reports and
the benchmark suite.

Inside the `app` package so `pip install 'agent-bff[load]'` installs it with its commands
(`agent-bff-loadgen`, `agent-bff-stub`, `agent-bff-bench`; docs/load-testing.md), but nothing
in the gateway imports it: `import app` and `python -m app` never load this package or its
extra dependencies (hdrhistogram, matplotlib; the `load` extra).
"""

__version__ = "1"
