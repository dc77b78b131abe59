#!/usr/bin/env python3
"""Session-aware load generator for agent-bff (a wrapper of `agent-bff-loadgen`).

    .venv/bin/python scripts/loadgen.py --url http://127.0.0.1:8080 --app demo -c 50 -d 30

`--help` lists every option; docs/load-testing.md explains each figure.
"""

import sys

from app.loadkit.commands import loadgen

if __name__ == "__main__":
    sys.exit(loadgen())
