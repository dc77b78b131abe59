"""`scripts/concurrency.py` (issue 16's concurrency measurement), small: 200 concurrent slow
streams through one gateway process all complete, every event arrives stamped, and the
figures are reported. Timing is not asserted (a shared machine makes it noise)."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from tests.gateway_process import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "concurrency.py"


@pytest.mark.system
def test_two_hundred_concurrent_streams_all_complete(tmp_path: Path) -> None:
    out = tmp_path / "concurrency.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--streams",
            "200",
            "--events",
            "3",
            "--pause-ms",
            "300",
            "--warmup-streams",
            "5",
            "--max-seconds",
            "60",
            "--json",
            str(out),
        ],
        capture_output=True,
        timeout=110,
        check=False,
    )
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["completed"] == 200
    assert result["failures"] == {}
    assert result["events_delivered"] == 200 * 3  # every token event, with its stamp parsed
    assert result["peak_open"] > 0
    assert result["delivery_ms"]["p99"] >= result["delivery_ms"]["p50"] >= 0
    assert result["rss_kb_per_open_stream"] > 0
    assert result["open_files_limit"] >= 2 * 200
    assert b"completed" in proc.stdout


@pytest.mark.system
def test_refuses_what_it_cannot_bound() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--streams", "0"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert b"--streams must be" in proc.stderr


@pytest.mark.system
def test_tracemalloc_dump_holds_what_the_open_streams_allocated(tmp_path: Path) -> None:
    """`--tracemalloc-dump`: tracing starts with the streams, the snapshot is taken while they
    are open, and what it holds was allocated by the gateway's stream handling."""
    snap = tmp_path / "gw.snap"
    out = tmp_path / "concurrency.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--streams",
            "40",
            "--events",
            "10",
            "--pause-ms",
            "200",
            "--warmup-streams",
            "2",
            "--max-seconds",
            "60",
            "--tracemalloc-dump",
            str(snap),
            "--json",
            str(out),
        ],
        capture_output=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert json.loads(out.read_text())["tracemalloc_open_streams"] >= 32
    snapshot = tracemalloc.Snapshot.load(str(snap))
    files = {frame.filename for trace in snapshot.traces for frame in trace.traceback}
    assert any(name.endswith("/app/proxy/handler.py") for name in files)
