#!/usr/bin/env python3
"""The benchmark suite: the gateway beside its peers, ratios measured in one run (a wrapper of
`agent-bff-bench`).

    .venv/bin/python scripts/bench.py [--smoke] [--json results.json]

See the `app/loadkit/bench/` package for the layout, rows and targets.
"""

import sys

from app.loadkit.commands import bench

if __name__ == "__main__":
    sys.exit(bench())
