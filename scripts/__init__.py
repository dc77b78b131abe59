"""The repository's own tools, run from a checkout (`scripts/cluster`, `scripts/soak.py`, ...).

A package only so the tests import them by name (`from scripts import cluster`) without
editing `sys.path`; it is not installed. The load kit itself is `app.loadkit`, installed with
`pip install 'agent-bff[load]'`; `scripts/loadgen.py`, `upstream_stub.py` and `bench.py` are
wrappers of its commands.
"""
