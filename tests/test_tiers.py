"""The test tiers (tests/tiers.py): every test has exactly one, a `fast` test uses no
redis-server and no process, and the guard fails a test that reaches beyond its tier."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tests.tiers import (
    INTEGRATION_FIXTURES,
    STORE_PARAMS,
    SYSTEM_FIXTURES,
    TIERS,
    FixtureGuard,
    TierError,
    fixture_problem,
    guard,
    process_problem,
    take_problems,
    tier,
    tier_of,
)


def test_every_collected_test_has_exactly_one_tier(request: pytest.FixtureRequest) -> None:
    items = request.session.items
    assert items
    for item in items:
        marks = [m.name for m in item.iter_markers() if m.name in TIERS]
        assert marks == [tier(item)], item.nodeid


def test_no_fast_test_uses_a_redis_server_or_a_process(request: pytest.FixtureRequest) -> None:
    fast = [item for item in request.session.items if tier(item) == "fast"]
    for item in fast:
        used = set(getattr(item, "fixturenames", ())) & (INTEGRATION_FIXTURES | SYSTEM_FIXTURES)
        assert not used, f"{item.nodeid} uses {sorted(used)}"
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        assert all(params.get(name) != "redis" for name in STORE_PARAMS), item.nodeid


def test_this_test_is_fast(request: pytest.FixtureRequest) -> None:
    assert tier(request.node) == "fast"
    assert request.node.get_closest_marker("fast") is not None


def test_a_fast_test_that_starts_a_process_is_caught() -> None:
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert take_problems() == [
        f"a fast test started a process ({Path(sys.executable).name}): mark it @pytest.mark.system"
    ]


async def test_a_fast_test_that_starts_a_process_through_asyncio_is_caught() -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    assert await proc.wait() == 0
    assert [p.rsplit(": ", 1)[1] for p in take_problems()] == ["mark it @pytest.mark.system"]


@pytest.mark.parametrize(
    ("fixture", "needed"),
    [("shared_redis", "integration"), ("session_redis", "integration"), ("browser", "system")],
)
def test_a_fast_test_that_sets_up_a_fixture_beyond_its_tier_is_caught(
    request: pytest.FixtureRequest, fixture: str, needed: str
) -> None:
    """Every fixture set up (also through `getfixturevalue`, as `gateway_factory("redis")` sets
    up `shared_redis`; session-scoped ones too) passes the registered `FixtureGuard`."""
    plugin = request.config.pluginmanager.get_plugin("tiers-fixture-guard")
    assert isinstance(plugin, FixtureGuard)
    plugin.pytest_fixture_setup(cast(pytest.FixtureDef[Any], SimpleNamespace(argname=fixture)))
    assert take_problems() == [f"a fast test set up {fixture}: mark it @pytest.mark.{needed}"]
    plugin.pytest_fixture_setup(cast(pytest.FixtureDef[Any], SimpleNamespace(argname="upstream")))
    assert take_problems() == []


def test_a_caught_test_fails_with_tier_error(request: pytest.FixtureRequest) -> None:
    refused = pytest.raises(TierError, match=r"mark it @pytest\.mark\.system \(tests/tiers\.py\)$")
    with refused, guard(request.node):
        subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_a_failing_caught_test_keeps_its_failure_and_gets_a_note(
    request: pytest.FixtureRequest,
) -> None:
    with pytest.raises(ZeroDivisionError) as failure, guard(request.node):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        _ = 1 / 0
    assert "mark it @pytest.mark.system" in "".join(failure.value.__notes__)


@pytest.mark.parametrize(
    ("fixtures", "params", "markers", "expected"),
    [
        ((), {}, (), "fast"),
        (("gateway_factory", "upstream", "aiohttp_server"), {}, (), "fast"),
        (("gateway",), {"gateway": "fakeredis"}, (), "fast"),
        (("gateway",), {"gateway": "redis"}, (), "integration"),
        (("kind",), {"kind": "redis"}, (), "integration"),
        (("expected",), {"expected": "redis"}, (), "fast"),  # not a store kind
        (("shared_redis", "session_redis"), {}, (), "integration"),
        (("tier_integration",), {}, (), "integration"),
        ((), {}, ("redis_server",), "integration"),
        (("redis_server", "gateway_process"), {}, (), "system"),
        (("tier_system",), {}, (), "system"),
        ((), {}, ("browser",), "system"),
        ((), {}, ("system",), "system"),
        (("redis_server",), {}, ("system",), "system"),
        ((), {}, ("redis_server", "integration"), "integration"),
        ((), {}, ("parametrize", "asyncio"), "fast"),
    ],
)
def test_the_tier_comes_from_fixtures_parameters_and_marks(
    fixtures: tuple[str, ...], params: dict[str, object], markers: tuple[str, ...], expected: str
) -> None:
    assert tier_of(fixtures, params, markers) == expected


@pytest.mark.parametrize(
    ("fixtures", "markers"),
    [
        (("redis_server",), ("fast",)),
        (("gateway_process",), ("integration",)),
        ((), ("browser", "integration")),
        ((), ("integration", "system")),
    ],
)
def test_a_tier_mark_below_what_the_test_uses_is_refused(
    fixtures: tuple[str, ...], markers: tuple[str, ...]
) -> None:
    with pytest.raises(pytest.UsageError, match="keep one tier mark"):
        tier_of(fixtures, {}, markers)


@pytest.mark.parametrize(
    ("item_tier", "argv", "allowed"),
    [
        ("fast", ["/usr/bin/redis-server", "--port", "1"], False),
        ("fast", [sys.executable, "-m", "app"], False),
        ("integration", ["/usr/bin/redis-server", "--port", "1"], True),
        ("integration", ["redis-cli", "--cluster", "create"], True),
        ("integration", ["openssl", "req"], True),
        ("integration", [sys.executable, "-m", "app"], False),
        ("integration", "nginx -c x", False),
        ("system", ["nginx"], True),
        ("system", [sys.executable, "-m", "app"], True),
    ],
)
def test_what_each_tier_may_start(item_tier: str, argv: list[str] | str, allowed: bool) -> None:
    assert (process_problem(item_tier, argv) is None) is allowed


@pytest.mark.parametrize(
    ("item_tier", "fixture", "allowed"),
    [
        ("fast", "gateway_factory", True),
        ("fast", "shared_redis", False),
        ("fast", "session_redis", False),
        ("fast", "browser", False),
        ("integration", "redis_server", True),
        ("integration", "gateway_process", False),
        ("system", "gateway_process", True),
    ],
)
def test_what_each_tier_may_set_up(item_tier: str, fixture: str, allowed: bool) -> None:
    assert (fixture_problem(item_tier, fixture) is None) is allowed
