"""`scripts/soak.py`, short: 15 s of mixed load through nginx in front of two replicas while
Redis is SIGKILLed and restarted (AOF) and a replica is SIGKILLed and started again. It must
lose no session and keep the surviving replica's memory within the stated bound. Plus the
verdict logic on synthetic recordings (a lost session or runaway memory fails the soak)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from app.loadkit.recording import Recorder, ResumeCounts
from scripts import soak
from tests.gateway_process import REPO_ROOT

SOAK = REPO_ROOT / "scripts" / "soak.py"


@pytest.mark.redis_server
@pytest.mark.system
@pytest.mark.serial
def test_a_short_soak_loses_no_session_under_redis_and_replica_crashes(tmp_path: Path) -> None:
    report_path = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--duration", "15",
            "--replicas", "2",
            "--concurrency", "8",
            "--seed", "7",
            "--json", str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    assert report["passed"] is True
    assert report["lost_sessions"] == 0 and report["stale_sessions"] == 0
    assert report["continuity_checks"] > 100
    assert report["ok"] > 200 and report["streams_completed"] > 10
    # Resumable runs cut and resumed through nginx (any replica): none lost or repeated an
    # event unless its pumping replica was the one killed (counted as orphaned instead).
    assert report["resume_completed"] > 5
    assert report["resume_lost_events"] == report["resume_duplicated_events"] == 0
    faults = [fault["what"] for fault in report["faults"]]
    assert any(f.startswith("redis restart") for f in faults), faults
    assert "replica 1 SIGKILL" in faults and "replica 1 start" in faults
    assert "0" in report["rss_growth_mib"], "the surviving replica's memory was not measured"
    # The report a person reads says all of it.
    for words in ("requests:", "errors by kind:", "verified intact", "RSS", "PASSED"):
        assert words in done.stdout


def recording(*, lost: int = 0, stale: int = 0, ok: int = 1000, resume_lost: int = 0) -> Recorder:
    """A load-kit recording with the figures `summarize` reads set by hand."""
    recorder = Recorder(planned_seconds=15)
    recorder.count = Counter(read=ok, write=3)
    recorder.ok = Counter(read=ok)
    recorder.errors = Counter({("write", "status_503"): 3})
    recorder.sessions_created = 8
    recorder.sessions_recreated = 1
    recorder.checks = 900
    recorder.lost = lost
    recorder.stale = stale
    recorder.users_with_loss = {1} if lost or stale else set()
    recorder.streams_completed = 50
    recorder.aborted = 0
    recorder.resume = ResumeCounts(runs=20, completed=18, lost=resume_lost, orphaned=2)
    return recorder


def verdict(recorder: Recorder, before_mib: float, after_mib: float) -> list[str]:
    args = argparse.Namespace(max_rss_growth_mib=64.0, min_requests=100, concurrency=8, replicas=2)
    report = soak.SoakReport(duration=15, replicas=2, concurrency=8, max_rss_growth_mib=64.0)
    report.faults = [soak.Fault("x", 1, 1), soak.Fault("y", 2, 1), soak.Fault("z", 3, 1)]
    mib = 1024 * 1024
    soak.summarize(
        report,
        recorder,
        {0: (100, int(before_mib * mib))},
        {0: (100, int(after_mib * mib))},
        args,
    )
    return report.problems


def test_the_soak_verdict_fails_on_a_lost_or_stale_session_and_on_memory_growth() -> None:
    assert verdict(recording(), 60, 70) == []
    assert any("lost" in p for p in verdict(recording(lost=1), 60, 70))
    assert any("stale" in p for p in verdict(recording(stale=1), 60, 70))
    assert any("grew" in p for p in verdict(recording(), 60, 200))
    assert any("succeeded" in p for p in verdict(recording(ok=10), 60, 70))
    assert any("lost 1 and duplicated" in p for p in verdict(recording(resume_lost=1), 60, 70))
