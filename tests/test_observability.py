"""The shipped Grafana dashboard and Prometheus alert rules (issue 15 item 10), checked offline:
`promtool check rules` and `promtool test rules` on the alerts, every dashboard query parsed by
promtool too, and every metric either of them names exported by a running gateway (memory and
Redis stores, after traffic), so a renamed series fails here, not on call."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from tests.conftest import CSRF, GatewayFactory

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "agent-bff.json"
ALERTS = REPO / "deploy" / "prometheus" / "agent-bff-alerts.yml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "agent-bff-alerts.test.yml"
GUIDE = REPO / "docs" / "observability.md"
# Metric names in PromQL: the gateway's own and the process collector's.
METRIC_NAME = re.compile(r"\b(?:agent_bff|process|python)_[a-zA-Z0-9_]+\b")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}
# Grafana's variables, as a query would see them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*", "$application": ".*"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:  # a failure, not a skip: the rules would ship unchecked
        pytest.fail(
            "promtool is missing: run scripts/system-deps (Debian package `prometheus`) "
            "or put Prometheus' promtool on PATH"
        )
    return path


def run_promtool(*args: str) -> None:
    result = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def documented_exprs() -> list[str]:
    """The example queries of docs/observability.md: its ```promql block, one query per
    paragraph (comments dropped)."""
    blocks = re.findall(r"```promql\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert blocks, "docs/observability.md has no promql block"
    exprs = []
    for block in blocks:
        for paragraph in block.split("\n\n"):
            lines = [line for line in paragraph.splitlines() if not line.startswith("#")]
            if lines:
                exprs.append("\n".join(lines))
    return exprs


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = dashboard["panels"]
    return [p for p in panels if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]]


def alert_exprs() -> list[str]:
    rules = YAML(typ="safe").load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


@pytest.mark.system
def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    run_promtool("check", "rules", str(ALERTS))
    run_promtool("test", "rules", str(ALERT_TESTS))
    names = {
        r["alert"] for g in YAML(typ="safe").load(ALERTS.read_text())["groups"] for r in g["rules"]
    }
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert names == tested  # every alert is shown to fire in the unit tests
    for topic in ("5xx", "SessionStoreUnavailable", "UpstreamErrors", "PoolSaturated", "P99"):
        assert any(topic in name for name in names), topic


@pytest.mark.system
def test_every_dashboard_and_documented_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel's query and each example of docs/observability.md (as
    recording rules; Grafana's variables filled in)."""
    rules = []
    examples = documented_exprs()
    assert len(examples) >= 8
    for i, expr in enumerate(dashboard_exprs() + examples):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:panel_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", str(path))


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "application"}
    for panel in dashboard_panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            # Every query names at least one series (no constant panels).
            assert METRIC_NAME.search(target["expr"]), (panel["title"], target["expr"])


@pytest.mark.redis_server
async def test_every_metric_named_by_the_dashboard_and_alerts_is_exported(
    gateway_factory: GatewayFactory,
) -> None:
    exported: dict[str, str] = {}  # family name -> type, from both stores
    for kind in ("memory", "redis"):
        gw = await gateway_factory(kind)
        assert (
            await gw.client.patch("/apps/demo/session", json={"a": 1}, headers=CSRF)
        ).status == 200
        async with gw.client.post(
            "/apps/demo/agent/chat", headers=CSRF, json={"message": "hi"}
        ) as r:
            await r.read()
        async with gw.client.get("/metrics") as response:
            assert response.status == 200
            text = await response.text()
        for family in text_string_to_metric_families(text):
            exported[family.name] = family.type
    valid = {family + suffix for family, kind in exported.items() for suffix in SUFFIXES[kind]}
    named = {
        name for expr in dashboard_exprs() + alert_exprs() for name in METRIC_NAME.findall(expr)
    }
    assert named, "no metric names found"
    assert named - valid == set(), f"named but not exported: {sorted(named - valid)}"
    # The series the dashboard is about are all used.
    for wanted in (
        "agent_bff_upstream_time_to_first_byte_seconds_bucket",
        "agent_bff_stream_duration_seconds_bucket",
        "agent_bff_active_streams",
        "agent_bff_redis_pool_connections",
        "agent_bff_upstream_slots_in_use",
    ):
        assert wanted in named, wanted
