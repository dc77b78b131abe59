"""The README states facts the code can check: these keep them true.

- The CORS headers a preflight allows are the ones the README lists (it listed 4 of 6).
- Every setting `app/config.py` reads has one row in the configuration table, and no setting
  has a second table elsewhere (a repeated TLS table and a "New settings (add to the
  configuration table)" note were left from editing).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import GatewayFactory
from tests.gateway_process import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
ORIGIN = "https://shop.example.com"


def section(title: str) -> str:
    """The README text from heading `title` to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", README, re.MULTILINE)
    assert match is not None, title
    level = len(match.group(1))
    rest = README[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def table_variables(text: str) -> list[str]:
    """Upper-case names in the first cell of every table row of `text`."""
    names: list[str] = []
    for line in text.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names += re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell)
    return names


async def test_the_readme_lists_the_cors_headers_a_preflight_allows(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    apps = tmp_path / "apps.toml"
    apps.write_text(
        f'[apps.shop]\nupstream = "http://127.0.0.1:9/v1"\nallowed_origins = ["{ORIGIN}"]\n'
    )
    gw = await gateway_factory("memory", APPS_FILE=str(apps))
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "PATCH"}
    resp = await gw.client.options("/apps/shop/session", headers=preflight)
    assert resp.status == 204
    sent = {h.strip() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    bullet = README[README.index("Preflights for allowed origins") :]
    bullet = bullet[: bullet.index("\n- ")]
    documented = set(re.findall(r"`([A-Za-z]+(?:-[A-Za-z]+)+|Accept|Authorization)`", bullet))
    documented.discard("Access-Control-Allow-Credentials")
    assert documented == sent


def test_every_setting_has_exactly_one_row_in_the_configuration_table() -> None:
    config_source = (REPO_ROOT / "app" / "config.py").read_text()
    read = set(re.findall(r'"([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|HOST|PORT)"', config_source))
    read |= {"UVLOOP"}  # read by app/__main__.py before the settings
    table = table_variables(section("Configuration"))
    assert sorted(n for n, c in Counter(table).items() if c > 1) == []
    assert sorted(read - set(table)) == []
    # Elsewhere in the README, settings are referred to, never tabulated a second time.
    elsewhere = README.replace(section("Configuration"), "")
    assert sorted(set(table_variables(elsewhere)) & read) == []
    assert "New settings" not in README


@pytest.mark.parametrize(
    "document",
    ["README.md", "CHANGELOG.md", "docs/frontend.md", "docs/faq.md", "docs/upgrading.md"],
)
def test_relative_links_resolve(document: str) -> None:
    path = REPO_ROOT / document
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    missing = [t for t in local if not (path.parent / t).exists()]
    assert missing == []
