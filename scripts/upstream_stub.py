#!/usr/bin/env python3
"""An upstream agent stub streaming deterministic SSE: `python scripts/upstream_stub.py --port N`.

See `scripts/loadkit/stub.py` for the routes and options.
"""

import sys

from loadkit.stub import main

if __name__ == "__main__":
    sys.exit(main())
