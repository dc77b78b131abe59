#!/usr/bin/env python3
"""Concurrent slow streams through one gateway: RSS per open stream, completion, delivery p99.

    .venv/bin/python scripts/concurrency.py --streams 5000 [--json out.json]

See `app/loadkit/concurrency.py` for what runs and what is measured (loopback only).
"""

import sys

from app.loadkit.concurrency import main

if __name__ == "__main__":
    sys.exit(main())
