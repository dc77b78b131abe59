"""The run counters of this process as Prometheus series (`agent_bff_runs_*`,
`agent_bff_run_*`), read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from app.metrics import ScrapeCollector
from app.runs.readers import READER_LIMITS
from app.runs.runs import RunRegistry


class RunsCollector(ScrapeCollector[RunRegistry]):
    """The run counters as Prometheus series, read at scrape time."""

    def collect(self) -> Iterator[Metric]:
        registry = self.source
        counters = registry.counters
        yield GaugeMetricFamily(
            "agent_bff_runs_active", "Resumable runs pumping in this process.", registry.active
        )
        yield GaugeMetricFamily(
            "agent_bff_runs_ended_bytes",
            "Bytes of events of the ended runs this process keeps readable.",
            registry.ended_bytes,
        )
        for name, text, value in (
            ("agent_bff_runs_started", "Resumable runs started here.", counters.started),
            (
                "agent_bff_runs_created_ended",
                "Of those, runs whose whole answer had arrived when they started (created "
                "ended, in one Redis command, with no pump).",
                counters.whole,
            ),
            (
                "agent_bff_runs_unresumable",
                "Resumable streams relayed without a run (the run store failed at start, or "
                "the application was over resume_redis_budget_bytes).",
                counters.unresumable,
            ),
            (
                "agent_bff_runs_over_budget",
                "Resumable streams relayed without a run: the application's ended runs held "
                "its resume_redis_budget_bytes in Redis.",
                counters.over_budget,
            ),
            (
                "agent_bff_runs_cut_over_budget",
                "Runs whose events stopped going to Redis mid-way (resumable from then on only "
                "where they run): their growth took the application over "
                "resume_redis_budget_bytes.",
                counters.cut_over_budget,
            ),
            (
                "agent_bff_runs_rate_limited",
                "Resumable streams relayed without a run: their client address was over the "
                "application's resume_runs_per_client.",
                counters.rate_limited,
            ),
            ("agent_bff_run_resumes", "Resume requests served here.", counters.resumes),
            (
                "agent_bff_run_replayed_events",
                "Events sent by resumes that were already stored when the resume began.",
                counters.replayed_events,
            ),
            (
                "agent_bff_runs_orphaned",
                "Readers here that found a run's pumping replica gone.",
                counters.orphaned,
            ),
            (
                "agent_bff_runs_expired",
                "Runs cancelled because nobody read them within their window.",
                counters.expired,
            ),
            (
                "agent_bff_runs_evicted",
                "Ended runs forgotten before their window (RUN_ENDED_MAX_RUNS/_BYTES).",
                counters.evicted,
            ),
        ):
            yield CounterMetricFamily(name, text, value=value)
        ended = CounterMetricFamily(
            "agent_bff_runs_ended", "Runs pumped here that ended, by reason.", labels=["reason"]
        )
        for reason, count in sorted(counters.ended.items()):
            ended.add_metric([reason], count)
        yield ended
        refused = CounterMetricFamily(
            "agent_bff_run_resumes_refused",
            "Resume requests refused with 503 upstream_busy, by application and full limit "
            "(app/runs/readers.py).",
            labels=["application", "limit"],
        )
        followed = GaugeMetricFamily(
            "agent_bff_runs_followed",
            "Runs pumped elsewhere that this process follows from Redis, by application.",
            labels=["application"],
        )
        for app_id, slots in sorted(registry.readers.apps.items()):
            followed.add_metric([app_id], slots.follows)
            for limit in READER_LIMITS:
                refused.add_metric([app_id, limit], slots.refused[limit])
        yield refused
        yield followed
