"""`scripts/bench.py --smoke`: every benchmark row runs once, briefly, and reports sanely.

Figures are not asserted (a smoke run is too short to mean anything); what is asserted is
that every server started, every row served requests without errors, and the Redis rows
counted their commands.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gateway_process import REPO_ROOT

BENCH = REPO_ROOT / "scripts" / "bench.py"


@pytest.mark.system
@pytest.mark.serial
def test_bench_smoke_runs_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", str(out)],
        capture_output=True,
        timeout=110,
        check=False,
    )
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, stderr[-3000:]
    results = json.loads(out.read_text())
    rows = results["rows"]
    expected = {
        "gw_redis_read", "gw_redis_write", "gw_mem_read", "gw_mem_write", "stock_read",
        "stock_write", "nosession", "rawget", "sse_direct", "sse_gateway", "sse_nginx",
        "gw_redis_read_enc", "gw_redis_write_enc", "sse_gateway_limited",
        "sse_gateway_resumable", "gw_mem_read_public", "gw_redis_read_public",
    }  # fmt: skip
    assert set(rows) == expected
    for key, row in rows.items():
        assert row["requests"] > 0, key
        assert row["errors"] == 0, key
    # Redis commands are counted per row (the gateway's own budget is asserted by its
    # command-count tests; here only that the bench sees it): a read is one GETEX, a write
    # more than that, the stock peer's read one GET.
    assert 0.95 <= rows["gw_redis_read"]["redis_commands_per_request"] <= 1.1
    assert rows["gw_redis_read"]["redis_commands_by_name"].keys() == {"getex"}
    assert rows["gw_redis_write"]["redis_commands_per_request"] > 1.5
    assert rows["stock_read"]["redis_commands_by_name"].keys() == {"get"}
    # The cost rows really run the optional features: the encrypted gateway stores no
    # plaintext (checked by its own tests; here: its reads are GETEX too), and the limited
    assert rows["gw_redis_read_enc"]["redis_commands_by_name"].keys() == {"getex"}
    # gateway checks its buckets with one script call per stream (the plain one runs a script
    # only when a session's first stream stores its conversation id).
    assert rows["sse_gateway_limited"]["redis_commands_by_name"]["evalsha"] >= 0.9
    assert rows["sse_gateway"]["redis_commands_by_name"].get("evalsha", 0) < 0.5
    assert all(row["cpu_us_per_request"] > 0 for row in rows.values())
    assert set(results["ttfe_ms"]) == {"direct", "gateway", "nginx"}
    assert results["memory_fill"]["sessions_created"] >= 2000
    assert results["memory_steady"]["run_lost_sessions"] == 0
    names = [r["name"] for r in results["ratios"]]
    assert "gateway Redis read / stock RedisStorage read" in names
    assert "(cost) SSE with rate limits / without" in names
    # Resumable runs: the row really writes runs to Redis, and both figures are reported.
    # Every stream of the row is a run (the gateway's `agent_bff_runs_started_total`), none
    # relayed without resume for its application's budget (the row once measured a mix).
    resumable = rows["sse_gateway_resumable"]
    assert resumable["redis_commands_by_name"]["xadd"] >= 1
    counts = resumable["run_counts"]
    assert counts["started"] >= 0.99 * resumable["requests"], counts
    assert counts["unresumable"] == 0, counts
    share = [r for r in results["ratios"] if r["name"].startswith("share of the resumable")]
    assert share and share[0]["met"], share
    assert "gateway CPU per stream: resumable run (Redis) / plain relay" in names
    memory = results["resumable_memory"]
    assert memory["complete"] == memory["runs"] and memory["bytes_per_run"] > 10_000
    table = proc.stdout.decode()
    assert "gateway, Redis store: read" in table
    assert "ratio / figure" in table
