"""The kit's console commands (`[project.scripts]` in pyproject.toml), also run by the wrappers
in scripts/: `agent-bff-loadgen`, `agent-bff-stub`, `agent-bff-bench`.

A plain `pip install agent-bff` installs these commands too, without the `load` extra: each
checks first that the extra modules it needs are importable and otherwise says what to install
(exit status 2) instead of ending in a traceback. Each imports its module only when run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence

EXIT_MISSING_EXTRA = 2


def run_command(command: str, module: str, needs: Sequence[str]) -> int:
    """Run `module.main()` as `command` once every module in `needs` can be imported."""
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"{command} needs the load kit's dependencies (missing: {', '.join(missing)}); "
            "install them with: pip install 'agent-bff[load]'",
            file=sys.stderr,
        )
        return EXIT_MISSING_EXTRA
    main: Callable[[], int] = importlib.import_module(module).main
    return main()


def loadgen() -> int:
    """`agent-bff-loadgen`: session-aware virtual users against a gateway (`--html` also needs
    matplotlib, checked by the command itself)."""
    return run_command("agent-bff-loadgen", "app.loadkit.loadgen", needs=("hdrh",))


def stub() -> int:
    """`agent-bff-stub`: the deterministic SSE upstream agent (aiohttp only)."""
    return run_command("agent-bff-stub", "app.loadkit.stub", needs=())


def bench() -> int:
    """`agent-bff-bench`: the gateway beside its peers, as ratios (its mixed row runs loadgen)."""
    return run_command("agent-bff-bench", "app.loadkit.bench", needs=("hdrh",))
