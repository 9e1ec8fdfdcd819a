"""Prometheus metrics: job figures come from the database at scrape time, so every API replica
reports the same numbers whatever process ran the job; request figures are per process."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.models import Job, JobState

WAIT_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)
RUN_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 6 * 3600.0)
RECENT_JOBS = 10_000  # the histograms cover the newest finished jobs, bounding scrape cost


class Metrics:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.upload_bytes = Counter(
            "antidote_upload_bytes", "Bytes accepted into the blob store", registry=self.registry
        )
        self.uploads_rejected = Counter(
            "antidote_uploads_rejected",
            "Uploads refused",
            ["code"],
            registry=self.registry,
        )
        self.requests = Counter(
            "antidote_http_requests",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "antidote_http_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            registry=self.registry,
        )
        self.registry.register(_JobCollector(sessions))


class _JobCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("antidote_jobs", "Jobs by state", labels=["state"])
        with self._sessions() as session:
            counts: dict[str, int] = {
                state: count
                for state, count in session.execute(
                    select(Job.state, func.count()).group_by(Job.state)
                )
            }
            times = [
                (created, start, end)
                for created, start, end in session.execute(
                    select(Job.create_time, Job.start_time, Job.end_time)
                    .where(Job.start_time.is_not(None))
                    .order_by(Job.create_time.desc())
                    .limit(RECENT_JOBS)
                )
            ]
        for state in JobState:
            by_state.add_metric([state.value], counts.get(state.value, 0))
        yield by_state
        waits = [(start - created).total_seconds() for created, start, _ in times if start]
        runs = [(end - start).total_seconds() for _, start, end in times if start and end]
        yield _histogram(
            "antidote_job_queue_wait_seconds",
            "From creation to the latest start",
            waits,
            WAIT_BUCKETS,
        )
        yield _histogram(
            "antidote_job_run_seconds", "From the latest start to the end", runs, RUN_BUCKETS
        )


def _histogram(
    name: str, documentation: str, values: list[float], buckets: tuple[float, ...]
) -> HistogramMetricFamily:
    cumulative = [(str(bound), float(sum(v <= bound for v in values))) for bound in buckets]
    cumulative.append(("+Inf", float(len(values))))
    return HistogramMetricFamily(
        name, documentation, buckets=cumulative, sum_value=float(sum(values))
    )
