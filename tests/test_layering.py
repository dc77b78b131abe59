"""The package's layering, checked on the source: where keys live, who may import whom."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from app.sessions.backend import SessionBackend
from app.sessions.memory import MemoryBackend
from app.sessions.redis import RedisBackend

APP = Path(__file__).resolve().parent.parent / "app"


def _modules() -> list[Path]:
    """The gateway's modules: not the load kit (app/loadkit/, its own aiohttp programs with
    their own keys)."""
    return sorted(
        p for p in APP.rglob("*.py") if "static" not in p.parts and "loadkit" not in p.parts
    )


def _key_definitions(path: Path) -> list[str]:
    """Module-level names bound to a new `web.AppKey(...)` / `web.RequestKey(...)`."""
    names: list[str] = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        value: ast.expr | None
        if isinstance(node, ast.Assign):
            value, targets = node.value, node.targets
        elif isinstance(node, ast.AnnAssign):
            value, targets = node.value, [node.target]
        else:
            continue
        if not isinstance(value, ast.Call) or not isinstance(value.func, ast.Attribute):
            continue
        if value.func.attr not in ("AppKey", "RequestKey"):
            continue
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports at run time (imports under `if TYPE_CHECKING:` excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_shared_keys_are_defined_only_in_app_keys() -> None:
    """Every application and request key the modules share is in app/keys.py; another module
    may keep only a private (underscore) key of its own."""
    public = {
        str(path.relative_to(APP.parent)): [n for n in _key_definitions(path) if n[0] != "_"]
        for path in _modules()
    }
    elsewhere = {path: names for path, names in public.items() if names and path != "app/keys.py"}
    assert elsewhere == {}
    assert "SETTINGS_KEY" in public["app/keys.py"]
    assert "APP_CONFIG_KEY" in public["app/keys.py"]


@pytest.mark.system
def test_app_keys_imports_nothing_of_the_gateway_at_run_time() -> None:
    """Any module can import the keys without an import cycle."""
    assert not {m for m in _imported_modules(APP / "keys.py") if m.startswith("app")}
    code = "import sys, app.keys; print(sorted(m for m in sys.modules if m.startswith('app')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['app', 'app.keys']"


def test_rate_limiter_does_not_import_the_middleware() -> None:
    imported = _imported_modules(APP / "ratelimit.py")
    assert not {m for m in imported if m.startswith("app.middlewares")}


def _loaded_after_import(module: str) -> set[str]:
    """The top-level packages loaded by importing `module` in a fresh interpreter."""
    code = (
        f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.system
def test_configuration_parses_redis_urls_without_redis_py() -> None:
    """`app.config` validates `REDIS_URL` with the standard library (app/sessions/redis_url.py):
    reading the configuration loads neither redis-py nor aiohttp."""
    loaded = _loaded_after_import("app.config")
    assert "app" in loaded
    assert not loaded & {"redis", "aiohttp"}


@pytest.mark.system
def test_sessions_depend_on_their_own_options_not_on_the_gateway() -> None:
    """app/sessions/ imports, of the gateway, only itself, the keys and the error envelope:
    never the configuration (`SessionOptions` instead, built in `app.main`) nor proxy trust
    (`app.forwarding`: the wiring decides the cookie's Secure flag and passes it)."""
    allowed = {"app", "app.keys", "app.errors", "app.sessions"}
    outside = {
        f"{path.name}: {module}"
        for path in sorted((APP / "sessions").glob("*.py"))
        for module in _imported_modules(path)
        if module.split(".")[0] == "app"
        and module not in allowed
        and not module.startswith("app.sessions.")
        and not module.startswith(("app.keys.", "app.errors."))
    }
    assert outside == set()
    modules = ", ".join(f"app.sessions.{p.stem}" for p in (APP / "sessions").glob("[a-z]*.py"))
    code = f"import sys, {modules}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not {"app.config", "app.forwarding", "app.main"} & set(out.stdout.split())


def test_stores_offer_the_contract_and_only_what_the_gateway_calls() -> None:
    """Each store implements every operation of the contract (app/sessions/backend.py), and
    beyond it only what the wiring calls (the memory sweep, the Redis start-up check): no
    method that only tests use (tests read and plant values through `tests.conftest.MemoryRaw`)."""
    contract = {name for name in vars(SessionBackend) if not name.startswith("_")}
    extras = {MemoryBackend: {"start_sweeping", "sweep"}, RedisBackend: {"check_server"}}
    for store, wired in extras.items():
        public = {n for n, v in vars(store).items() if not n.startswith("_") and callable(v)}
        assert public == contract | wired, store.__name__
