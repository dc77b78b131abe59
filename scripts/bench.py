#!/usr/bin/env python3
"""The benchmark suite: the gateway beside its peers, ratios measured in one run.

    .venv/bin/python scripts/bench.py [--smoke] [--json results.json]

See `scripts/loadkit/bench.py` for the layout, rows and targets.
"""

import sys

from loadkit.bench import main

if __name__ == "__main__":
    sys.exit(main())
