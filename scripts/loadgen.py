#!/usr/bin/env python3
"""Session-aware load generator for agent-bff.

    .venv/bin/python scripts/loadgen.py --url http://127.0.0.1:8080 --app demo -c 50 -d 30

`--help` lists every option; the README's "Load testing" section explains each figure.
"""

import sys

from loadkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
