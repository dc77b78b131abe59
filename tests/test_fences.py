"""Other libraries' private names stay behind the fenced modules, and those modules' fallbacks
work: app/redis_internals.py (a Redis cluster node's connection lists).

The scan (`test_no_private_names_of_other_libraries_outside_the_fences`) reads every module
in app/ (AST) and refuses, outside `FENCED`:
- `from <library> import _name` and `import <library>._module` (any underscore name of a module
  that is not ours);
- an underscore attribute of a name bound by importing another library
  (`prometheus_metrics._use_created`, `aiohttp.StreamReader._wait`);
- `getattr`/`hasattr`/`setattr`/`delattr` of an underscore name given as a string (the usual
  "defensive" way to reach another library's field), unless on `self`/`cls`;
- `x._name` for a name in `KNOWN_PRIVATE`: names that other libraries' objects in our reach
  have (aiohttp's `StreamReader`, redis-py's pools and cluster nodes, prometheus-client) and
  app/ code does not define on its own classes; `self._name` and `cls._name` pass.
Its limits: attributes are not typed, so `obj._name` on another library's object (a request, a
pool, a response) whose name is not listed passes, as does `self._name` in a subclass of another
library's class; a name our own classes also use on other objects (`_run`, `_saved`) cannot be
listed. `KNOWN_PRIVATE` grows with each one found.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from redis.asyncio.cluster import ClusterNode

from app import metrics, redis_internals
from app.metrics import _pool_usage, _StoreCollector
from app.sessions.memory import MemoryBackend

APP = Path(__file__).resolve().parent.parent / "app"
# The modules allowed to read other libraries' private names, each with a start-up self-check
# and a public-API fallback (tested here, in tests/test_access_log.py and test_fast_metrics.py).
FENCED = {
    "redis_internals.py",
    # aiohttp `StreamReader` fields and the held-back head of the relay (issue 14 item 2).
    "proxy/fastread.py",
}
KNOWN_PRIVATE = {
    # redis-py
    "_in_use_connections",
    "_available_connections",
    "_connections",
    "_free",
    "_connection_kwargs",
    # prometheus-client
    "_use_created",
    "_value",
    "_lock",
    "_metrics",
    "_labelvalues",
    "_upper_bounds",
    "_buckets",
    # aiohttp
    "_buffer",
    "_buffer_offset",
    "_read_nowait",
    "_waiter",
    "_exception",
    "_protocol",
    "_cookie_helpers",
    "_headers",
    "_payload",
    "_transport",
    "_low_water",
    "_http_chunk_splits",
    "_send_headers_immediately",
    # aiohttp-session
    "_cookie_params",
    "_max_age",
}
OURS = "app"


def _private(name: str) -> bool:
    """`_name`, not `__dunder__` (`__future__`, `__version__`)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _foreign_names(tree: ast.Module) -> set[str]:
    """Names a module binds to another library by import (`import redis`, `from prometheus_client
    import metrics as prometheus_metrics`, `from aiohttp import web`)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != OURS:
                    names.add(alias.asname or alias.name.split(".")[0])
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] != OURS
        ):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _root(node: ast.expr) -> str | None:
    """`a` of `a.b.c`; None when the chain does not start at a plain name."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _violations(source: str, where: str) -> list[str]:
    found: list[str] = []
    tree = ast.parse(source, where)
    foreign = _foreign_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == OURS:
                continue
            private_module = any(_private(p) for p in node.module.split("."))
            for alias in node.names:
                if private_module or _private(alias.name):
                    found.append(f"{where}:{node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] != OURS and any(_private(p) for p in parts):
                    found.append(f"{where}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            root = _root(node.value)
            if node.attr in KNOWN_PRIVATE and root not in {"self", "cls"}:
                found.append(f"{where}:{node.lineno}: .{node.attr}")
            elif root in foreign:  # `aiohttp.StreamReader._wait`, `prometheus_metrics._x`
                found.append(f"{where}:{node.lineno}: {root}...{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "hasattr", "setattr", "delattr"}
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
            and _root(node.args[0]) not in {"self", "cls"}
        ):
            # A private name read by string: the usual way to reach another library's field
            # "defensively"; our own code has no reason to.
            found.append(f"{where}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_no_private_names_of_other_libraries_outside_the_fences() -> None:
    modules = sorted(APP.rglob("*.py"))
    assert len(modules) > 20
    found = [
        v
        for m in modules
        if (name := m.relative_to(APP).as_posix()) not in FENCED
        for v in _violations(m.read_text(), f"app/{name}")
    ]
    assert found == []
    fenced = [APP / name for name in FENCED]
    assert all(_violations(m.read_text(), m.name) for m in fenced)  # each fence has a reason


def test_the_scan_finds_what_it_is_meant_to() -> None:
    """The scan is not vacuous: each kind of access it refuses is found in a sample."""
    sample = (
        "from __future__ import annotations\n"
        "import aiohttp\n"
        "from prometheus_client import metrics as prometheus_metrics\n"
        "from aiohttp import _cookie_helpers\n"
        "from prometheus_client.metrics import _use_created\n"
        "import aiohttp._http_parser\n"
        "from app.state import _private_is_ours\n"
        "x = pool._in_use_connections\n"
        "y = getattr(node, '_free', ())\n"
        "z = self._buffer\n"
        "w = hasattr(self._backend, '_ours') or hasattr(backend, '__len__')\n"
        "v = prometheus_metrics._registry or aiohttp.StreamReader._wait\n"
        "u = request._cache or stored._saved\n"
    )
    found = [v.split(": ", 1)[1] for v in _violations(sample, "sample.py")]
    assert sorted(found) == sorted(
        [
            "from aiohttp import _cookie_helpers",
            "from prometheus_client.metrics import _use_created",
            "import aiohttp._http_parser",
            "._in_use_connections",
            "getattr(..., '_free')",
            "prometheus_metrics..._registry",
            "aiohttp..._wait",
        ]
    )


class FakeCluster:
    """What app/metrics.py reads of a `redis.asyncio.RedisCluster`: `get_nodes()`."""

    def __init__(self, nodes: list[ClusterNode]) -> None:
        self.nodes = nodes

    def get_nodes(self) -> list[ClusterNode]:
        return self.nodes


def _cluster() -> FakeCluster:
    one = ClusterNode("127.0.0.1", 7000, max_connections=5)
    two = ClusterNode("127.0.0.1", 7001, max_connections=5)
    held = [one.acquire_connection(), one.acquire_connection(), two.acquire_connection()]
    one.release(held[0])  # no socket: these connection objects never connect
    return FakeCluster([one, two])


def test_cluster_node_counts_through_the_fence() -> None:
    assert redis_internals.self_check() is None
    assert _pool_usage(_cluster(), cluster_counts=True) == (2.0, 1.0, 10.0)


def test_without_the_fence_a_cluster_exports_only_its_bound() -> None:
    assert _pool_usage(_cluster(), cluster_counts=False) == (None, None, 10.0)


def test_a_failed_self_check_turns_the_cluster_counts_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(redis_internals, "node_connections", lambda node: None)  # renamed lists
    redis_internals.usable.cache_clear()
    try:
        assert redis_internals.self_check() is not None
        assert metrics.Metrics(fast=True).cluster_counts is False
        assert "no per-state Redis cluster connection gauge" in caplog.text
    finally:
        monkeypatch.undo()
        redis_internals.usable.cache_clear()
    assert metrics.Metrics(fast=True).cluster_counts is True
    assert metrics.Metrics(fast=False).cluster_counts is False


def test_the_store_collector_leaves_out_the_gauge_it_cannot_know() -> None:
    class ClusterBackend(MemoryBackend):
        client = _cluster()

    counted = {m.name for m in _StoreCollector(ClusterBackend(), cluster_counts=True).collect()}
    blind = {m.name for m in _StoreCollector(ClusterBackend(), cluster_counts=False).collect()}
    pool = "agent_bff_redis_pool_connections"
    assert pool in counted and pool not in blind
    assert "agent_bff_redis_pool_max_connections" in blind
