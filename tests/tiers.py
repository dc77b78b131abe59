"""Test tiers: every test is `fast`, `integration` or `system`, told by what it uses.

- `fast`: in process, on the memory store or fakeredis; no real redis-server, no other process.
  The inner loop: `scripts/test -m fast`.
- `integration`: a real `redis-server` (or a Redis topology: cluster, Sentinel, TLS) that the
  test starts on a free port; or the real Redis client on real sockets with production timeouts.
- `system`: other processes: `python -m app`, a browser, nginx, the load kit, the bench and soak
  smoke runs, external checkers (hadolint, promtool, ...).

`tier_of` derives an item's tier at collection from the fixtures it uses
(`INTEGRATION_FIXTURES`, `SYSTEM_FIXTURES`; a test module's own fixture that starts processes
requests `tier_system` or `tier_integration`, so its tests follow), from a store-kind parameter
whose value is `"redis"` (`STORE_PARAMS`, as in `gateway[redis]`), from the older markers
(`redis_server` -> integration, `browser` -> system) and from an explicit
`@pytest.mark.integration` / `@pytest.mark.system` where the fixtures do not tell (a test that
calls `run_gateway_to_exit`, or starts a `RedisServer` itself); the highest wins. Every item
ends with exactly one tier marker, so `-m fast`, `-m integration` and `-m system` split the
suite; an explicit mark below what the fixtures say is a usage error.

`guard` checks it while a test is set up and runs: a `fast` item that starts a process or sets up
a real-Redis fixture (also through `request.getfixturevalue`, as `gateway_factory("redis")`
does), or an `integration` item that starts anything but Redis's own binaries (and `openssl`
for TLS certificates), fails with `TierError` naming the mark it needs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

TIERS = ("fast", "integration", "system")
RANK = {tier: rank for rank, tier in enumerate(TIERS)}

# Fixtures that start (or hand out) a real redis-server: the test is at least `integration`.
# A fixture of a test module that starts one itself requests `tier_integration` (conftest).
INTEGRATION_FIXTURES = frozenset(
    {"session_redis", "shared_redis", "redis_server", "redis_gateway", "tier_integration"}
)
# Fixtures that start other processes: the test is `system`. A fixture of a test module that
# starts processes requests `tier_system` (conftest).
SYSTEM_FIXTURES = frozenset({"gateway_process", "browser", "tier_system"})
# Parameters that name a store kind (`STORE_KINDS` in tests/conftest.py); "redis" is a real one.
STORE_PARAMS = frozenset({"kind", "gateway", "gw", "gateways", "store", "redis"})
# The older markers, still accepted.
MARKER_TIERS = {"redis_server": "integration", "browser": "system"}
# What an `integration` test may start: a Redis server, Sentinel or CLI, TLS certificates.
INTEGRATION_EXECUTABLES = ("redis-", "openssl")

TIER_STASH = pytest.StashKey[str]()


class TierError(Exception):
    """A test uses more than its tier allows."""


def tier_of(
    fixturenames: Iterable[str], params: Mapping[str, object], markers: Iterable[str]
) -> str:
    """The tier the fixtures, the store-kind parameters and the markers ask for: the highest.

    Raises `pytest.UsageError` when a tier marker among `markers` is not that tier (a test
    marked `fast` that uses a redis-server, or marked twice)."""
    names = set(fixturenames)
    marks = list(markers)
    tier = "fast"
    if names & INTEGRATION_FIXTURES or any(params.get(p) == "redis" for p in STORE_PARAMS):
        tier = "integration"
    if names & SYSTEM_FIXTURES:
        tier = "system"
    for marker in marks:
        wanted = MARKER_TIERS.get(marker, marker)
        if wanted in RANK and RANK[wanted] > RANK[tier]:
            tier = wanted
    wrong = sorted({m for m in marks if m in RANK and m != tier})
    if wrong:
        raise pytest.UsageError(
            f"marked {', '.join(wrong)} but it is {tier}: keep one tier mark, the right one"
        )
    return tier


def assign(item: pytest.Item) -> str:
    """Give `item` its tier marker (unless it carries it already); returns the tier."""
    markers = [m.name for m in item.iter_markers()]
    callspec = getattr(item, "callspec", None)
    params: Mapping[str, object] = callspec.params if callspec is not None else {}
    try:
        tier = tier_of(getattr(item, "fixturenames", ()), params, markers)
    except pytest.UsageError as err:
        raise pytest.UsageError(f"{item.nodeid}: {err}") from None
    if tier not in markers:
        item.add_marker(tier)
    item.stash[TIER_STASH] = tier
    return tier


def tier(item: pytest.Item) -> str:
    """The tier `assign` gave `item`."""
    return item.stash.get(TIER_STASH, "system")


def _executable(args: Any) -> str:
    first = args if isinstance(args, (str, bytes, os.PathLike)) else next(iter(args), "")
    return os.path.basename(os.fsdecode(first)).split()[0] if first else ""


def process_problem(item_tier: str, args: Any) -> str | None:
    """What is wrong with a test of `item_tier` starting `args`, or None."""
    if item_tier == "system":
        return None
    name = _executable(args)
    if item_tier == "integration" and name.startswith(INTEGRATION_EXECUTABLES):
        return None
    needed = "integration" if name.startswith(INTEGRATION_EXECUTABLES) else "system"
    return f"a {item_tier} test started a process ({name}): mark it @pytest.mark.{needed}"


def fixture_problem(item_tier: str, fixture: str) -> str | None:
    """What is wrong with a test of `item_tier` setting up `fixture`, or None."""
    needed = (
        "system"
        if fixture in SYSTEM_FIXTURES
        else "integration"
        if fixture in INTEGRATION_FIXTURES
        else "fast"
    )
    if RANK[needed] <= RANK[item_tier]:
        return None
    return f"a {item_tier} test set up {fixture}: mark it @pytest.mark.{needed}"


@dataclass
class _Watch:
    tier: str
    problems: list[str] = field(default_factory=list)

    def note(self, problem: str | None) -> None:
        if problem is not None and problem not in self.problems:
            self.problems.append(problem)


_watching: list[_Watch] = []  # the item being set up or run, while `guard` is active


def current_tier() -> str | None:
    """The tier of the item `guard` is watching, None outside any."""
    return _watching[-1].tier if _watching else None


def take_problems() -> list[str]:
    """The problems noted so far for the watched item, forgotten (for tests of the guard)."""
    if not _watching:
        return []
    problems, _watching[-1].problems = _watching[-1].problems, []
    return problems


class FixtureGuard:
    """A plugin (conftest registers it) noting `fixture_problem` for every fixture set up while
    `guard` watches an item; a plugin rather than a conftest hook, which pytest does not call for
    session-scoped fixtures (such as `session_redis`)."""

    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[Any]) -> None:
        if _watching:
            _watching[-1].note(fixture_problem(_watching[-1].tier, fixturedef.argname))


class _GuardedPopen(subprocess.Popen[Any]):
    """`subprocess.Popen` that notes `process_problem` for the watched item."""

    def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
        if _watching:
            _watching[-1].note(process_problem(_watching[-1].tier, args))
        super().__init__(args, *rest, **kwargs)


@contextlib.contextmanager
def guard(item: pytest.Item) -> Iterator[None]:
    """Watch `item` while it is set up or runs: `subprocess.Popen` (what `subprocess.run` and
    asyncio's subprocesses use) and `FixtureGuard` note what its tier does not allow, and the
    phase then fails with `TierError` (or the failure it had gets the problems as a note).

    Noted rather than refused on the spot: a refusal inside a session-scoped fixture would be
    cached by pytest and fail every later test that uses it."""
    patch = pytest.MonkeyPatch()
    patch.setattr(subprocess, "Popen", _GuardedPopen)
    watch = _Watch(tier(item))
    _watching.append(watch)
    try:
        yield
    except BaseException as exc:
        if watch.problems:
            exc.add_note(_explain(watch.problems))
        raise
    finally:
        _watching.remove(watch)
        patch.undo()
    if watch.problems:
        raise TierError(_explain(watch.problems))


def _explain(problems: list[str]) -> str:
    return "; ".join(problems) + " (tests/tiers.py)"
