#!/usr/bin/env python3
"""An upstream agent stub streaming deterministic SSE (a wrapper of `agent-bff-stub`).

    .venv/bin/python scripts/upstream_stub.py --port N

See `app/loadkit/stub.py` for the routes and options.
"""

import sys

from app.loadkit.commands import stub

if __name__ == "__main__":
    sys.exit(stub())
