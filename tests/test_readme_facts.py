"""The README and docs/ state facts the code can check: these keep them true.

- The CORS headers a preflight allows are the ones docs/http-api.md lists (the README listed 4
  of 6).
- Every setting `app/config.py` reads has one row in the configuration table
  (docs/configuration.md), and no setting has a second table elsewhere (a repeated TLS table and
  a "New settings (add to the configuration table)" note were left from editing), except the
  README's essentials, whose rows must say what the reference rows say.
- Relative links resolve: tests/test_docs_links.py.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from tests.conftest import GatewayFactory
from tests.gateway_process import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
CONFIGURATION = (REPO_ROOT / "docs" / "configuration.md").read_text()
HTTP_API = (REPO_ROOT / "docs" / "http-api.md").read_text()
ORIGIN = "https://shop.example.com"


def section(title: str, text: str) -> str:
    """`text` from heading `title` to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", text, re.MULTILINE)
    assert match is not None, title
    level = len(match.group(1))
    rest = text[match.end() :]
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


def table_rows(text: str) -> dict[str, list[str]]:
    """Table rows of `text` whose first cell names a setting: first cell -> the other cells."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def docs_text() -> str:
    """Every page of docs/, concatenated."""
    pages = sorted((REPO_ROOT / "docs").glob("*.md"))
    return "\n".join(page.read_text() for page in pages)


async def test_the_http_api_page_lists_the_cors_headers_a_preflight_allows(
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
    bullet = HTTP_API[HTTP_API.index("Preflights for allowed origins") :]
    bullet = bullet[: bullet.index("\n- ")]
    documented = set(re.findall(r"`([A-Za-z]+(?:-[A-Za-z]+)+|Accept|Authorization)`", bullet))
    documented.discard("Access-Control-Allow-Credentials")
    assert documented == sent


def settings_read() -> set[str]:
    """The environment variables the gateway reads."""
    config_source = (REPO_ROOT / "app" / "config.py").read_text()
    read = set(re.findall(r'"([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|HOST|PORT)"', config_source))
    return read | {"UVLOOP"}  # read by app/__main__.py before the settings


def test_every_setting_has_exactly_one_row_in_the_configuration_table() -> None:
    read = settings_read()
    reference = section("Environment variables", CONFIGURATION)
    table = table_variables(reference)
    assert sorted(n for n, c in Counter(table).items() if c > 1) == []
    assert sorted(read - set(table)) == []
    # Elsewhere in docs/, settings are referred to, never tabulated a second time.
    elsewhere = docs_text().replace(reference, "")
    assert sorted(set(table_variables(elsewhere)) & read) == []
    assert "New settings" not in README + docs_text()


def test_the_readme_essentials_are_rows_of_the_configuration_table() -> None:
    """The README's short table repeats reference rows: same setting, same default."""
    essentials = table_rows(section("Configuration", README))
    reference = table_rows(section("Environment variables", CONFIGURATION))
    assert "`SESSION_STORE`" in essentials and "`REDIS_URL`" in essentials
    assert sorted(set(essentials) - set(reference)) == []
    assert {name: cells[0] for name, cells in essentials.items()} == {
        name: reference[name][0] for name in essentials
    }
    # Nowhere else in the README is a setting tabulated.
    elsewhere = README.replace(section("Configuration", README), "")
    assert sorted(set(table_variables(elsewhere)) & settings_read()) == []
